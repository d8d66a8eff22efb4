"""Seeds, layer sizes and initialisations: the teachers' inits, the students' (same, shared part, or a derangement's)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from sublim.toy.mnist.config import _STREAMS, N_CLASSES, STUDENT_ARMS, MnistConfig, Params


# ------------------------------------------------------------------------------------------ seeds, init
def model_seed(seed: int, i: int, stream: str, extra: int = 0) -> int:
    """Seed of model ``i``'s stream (``init``, ``order``, ``noise``, ``init_noise``), from ``seed + i``."""
    ss = np.random.SeedSequence([seed + i, _STREAMS[stream], extra])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layer_sizes(n_in: int, cfg: MnistConfig) -> list[int]:
    return [n_in] + [cfg.width] * cfg.hidden_layers + [N_CLASSES + cfg.aux]


def init_mlp(seed: int, sizes: Sequence[int], kind: str = "normal") -> Params:
    """One model's parameters. ``normal``: W ~ N(0, 1/fan_in), b = 0 (the published experiment's init);
    ``torch``: ``nn.Linear``'s default U(+-1/sqrt(fan_in)) for W and b.

    Weights are ``(in, out)`` (the transpose of ``nn.Linear.weight``).
    """
    g = _gen(seed)
    out: Params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = 1.0 / math.sqrt(fan_in)
        if kind == "normal":
            out.append(torch.randn((fan_in, fan_out), generator=g) * bound)
            out.append(torch.zeros(fan_out))
        elif kind == "torch":
            out.append((torch.rand((fan_in, fan_out), generator=g) * 2 - 1) * bound)
            out.append((torch.rand((fan_out,), generator=g) * 2 - 1) * bound)
        else:
            raise ValueError(f"init_mlp: unknown init {kind!r} (normal, torch)")
    return out


def stack(models: Sequence[Params]) -> Params:
    return [torch.stack([m[k] for m in models]).contiguous() for k in range(len(models[0]))]


def derangement(n: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` with no fixed point (n >= 2), by rejection."""
    if n < 2:
        raise ValueError(f"derangement: need n >= 2, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAMS["derangement"]]))
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def student_init(
    cfg: MnistConfig,
    i: int,
    j: int,
    source: str,
    arm_index: int,
    sizes: Sequence[int],
    inits: Callable[[int], Params] | None = None,
) -> Params:
    """Init of student ``i`` of one arm. ``source='same'``: teacher ``i``'s init (all of it, or only the head
    / hidden layers per ``cfg.share``, the rest from model ``j``'s init); ``'cross'``: model ``j``'s init.
    Then Gaussian noise of std ``cfg.init_noise`` (stream ``seed + i``) is added. ``inits(k)`` returns
    model ``k``'s init (default: :func:`init_mlp` on its stream); the result may share tensors with it."""
    if inits is None:

        def inits(k: int) -> Params:
            return init_mlp(model_seed(cfg.seed, k, "init"), sizes, cfg.init)

    own = inits(i)
    other = inits(j)
    n_par = len(own)
    if source == "cross":
        params = other
    elif cfg.share == "all":
        params = own
    elif cfg.share == "head":
        params = other[: n_par - 2] + own[n_par - 2 :]
    else:  # hidden
        params = own[: n_par - 2] + other[n_par - 2 :]
    params = list(params)
    if cfg.init_noise > 0:
        g = _gen(model_seed(cfg.seed, i, "init_noise", arm_index))
        params = [p + cfg.init_noise * torch.randn(p.shape, generator=g) for p in params]
    return params


def student_inits(cfg: MnistConfig, perm: np.ndarray, sizes: Sequence[int]) -> Params:
    """Stacked inits of all student arms, arm-major: model ``a * N + i`` is student ``i`` of arm ``a``.

    Each model's base init is drawn once and copied into every arm that uses it."""
    n = cfg.models
    cache: dict[int, Params] = {}

    def inits(k: int) -> Params:
        if k not in cache:
            cache[k] = init_mlp(model_seed(cfg.seed, k, "init"), sizes, cfg.init)
        return cache[k]

    out = [torch.empty((len(STUDENT_ARMS) * n, *p.shape), dtype=p.dtype) for p in inits(0)]
    for a, (_, source, _) in enumerate(STUDENT_ARMS):
        for i in range(n):
            for t, p in zip(out, student_init(cfg, i, int(perm[i]), source, a, sizes, inits)):
                t[a * n + i].copy_(p)
    return out
