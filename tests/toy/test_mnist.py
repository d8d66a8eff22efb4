"""MNIST auxiliary-logit experiment: arms, derangement, per-sample KL, readers, batched == loop, CLI.

All tiny (a few models of width 8 on the 8x8 scikit-learn digits or on files written here); seconds each.
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sublim.toy import mnist as M
from sublim.toy.mnist_data import DataError, load_digits, read_idx

TINY = {
    "data": "sklearn",
    "models": 3,
    "width": 8,
    "epochs": 1,
    "batch_size": 128,
    "noise_samples": 128,
    "student_batch_size": 64,
    "curve_points": 2,
    "curve_eval": 64,
    "progress": False,
    "precision": "fp32",
    "threads": 1,
}


# ------------------------------------------------------------------------------------------ helpers
def _idx_bytes(arr: np.ndarray) -> bytes:
    """idx encoding written by hand (magic 0 0 0x08 ndim, big-endian dims, raw uint8)."""
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _fake_mnist(n_train: int = 40, n_test: int = 20, side: int = 28, seed: int = 0):
    rng = np.random.default_rng(seed)
    xtr = rng.integers(0, 256, size=(n_train, side, side), dtype=np.uint8)
    xte = rng.integers(0, 256, size=(n_test, side, side), dtype=np.uint8)
    ytr = (np.arange(n_train) % 10).astype(np.uint8)
    yte = (np.arange(n_test) % 10).astype(np.uint8)
    return xtr, ytr, xte, yte


def _write_idx_folder(folder: Path, gz: bool, names: str = "standard") -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = _fake_mnist()
    stems = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    for stem, arr in zip(stems, arrays):
        data = _idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


def _check_digits(d, arrays) -> None:
    xtr, ytr, xte, yte = arrays
    assert d.side == 28 and d.n_features == 784
    np.testing.assert_allclose(d.x_train, xtr.reshape(len(xtr), -1) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(d.y_train, ytr)
    np.testing.assert_allclose(d.x_test, xte.reshape(len(xte), -1) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(d.y_test, yte)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64


# ------------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = _write_idx_folder(tmp_path / "mnist", gz)
    _check_digits(load_digits(tmp_path / "mnist"), arrays)
    one = tmp_path / "mnist" / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))
    np.testing.assert_array_equal(read_idx(one), arrays[1])


def test_torchvision_folder(tmp_path: Path) -> None:
    arrays = _write_idx_folder(tmp_path / "root" / "MNIST" / "raw", gz=False)
    _check_digits(load_digits(tmp_path / "root"), arrays)  # torchvision root
    _check_digits(load_digits(tmp_path / "root" / "MNIST"), arrays)  # the MNIST folder itself


def test_npz_round_trip(tmp_path: Path) -> None:
    xtr, ytr, xte, yte = _fake_mnist()
    p = tmp_path / "mnist.npz"
    np.savez(p, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    _check_digits(load_digits(p), (xtr, ytr, xte, yte))
    # x / y without a split: a fixed stratified split is made and stated
    q = tmp_path / "xy.npz"
    np.savez(q, x=np.concatenate([xtr, xte]), y=np.concatenate([ytr, yte]))
    d = load_digits(q)
    assert len(d.y_train) + len(d.y_test) == 60 and "stratified" in d.split
    assert np.bincount(d.y_test, minlength=10).tolist() == [1] * 10


def test_embedded_and_sklearn_digits() -> None:
    d = load_digits(None)
    assert (d.x_train.shape, d.x_test.shape) == ((4000, 784), (1000, 784))
    assert np.bincount(d.y_test).tolist() == [100] * 10 and "stratified" in d.split
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    s = load_digits("sklearn")
    assert s.side == 8 and s.n_features == 64 and len(s.y_train) + len(s.y_test) == 1797


@pytest.mark.parametrize(
    "case",
    ["magic", "truncated", "gzip", "missing", "npz_keys", "npz_labels", "npz_garbage", "nofile", "labels"],
)
def test_bad_files_give_one_line_error_naming_the_file(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "d"
    _write_idx_folder(folder, gz=False)
    img = folder / "train-images-idx3-ubyte"
    target: Path = folder
    named = img
    if case == "magic":
        img.write_bytes(b"\x12\x34\x56\x78" + img.read_bytes()[4:])
    elif case == "truncated":
        img.write_bytes(img.read_bytes()[:-10])
    elif case == "gzip":
        img.unlink()
        named = folder / "train-images-idx3-ubyte.gz"
        named.write_bytes(b"\x1f\x8b" + b"not really gzip")
    elif case == "missing":
        (folder / "t10k-labels-idx1-ubyte").unlink()
        named = folder
    elif case == "labels":
        lab = folder / "train-labels-idx1-ubyte"
        lab.write_bytes(_idx_bytes(np.zeros(39, dtype=np.uint8)))  # 39 labels for 40 images
        named = lab
    elif case == "npz_keys":
        named = target = tmp_path / "bad.npz"
        np.savez(target, images_only=np.zeros((3, 28, 28), dtype=np.uint8))
    elif case == "npz_labels":
        named = target = tmp_path / "bad2.npz"
        np.savez(target, x=np.zeros((12, 28, 28), dtype=np.uint8), y=np.full(12, 11))
    elif case == "npz_garbage":
        named = target = tmp_path / "garbage.npz"
        target.write_bytes(b"this is not a zip archive")
    elif case == "nofile":
        named = target = tmp_path / "nothing.npz"
    with pytest.raises(DataError) as e:
        load_digits(target)
    msg = str(e.value)
    assert "\n" not in msg and str(named) in msg, msg


# ------------------------------------------------------------------------------------ pieces, theory
def test_derangement_has_no_fixed_points() -> None:
    for n in (2, 3, 5, 25, 100):
        for seed in range(20):
            p = M.derangement(n, seed)
            assert sorted(p.tolist()) == list(range(n))
            assert not np.any(p == np.arange(n))
    assert M.derangement(25, 3).tolist() == M.derangement(25, 3).tolist()
    with pytest.raises(ValueError):
        M.derangement(1, 0)
    with pytest.raises(ValueError):
        M.MnistConfig(models=1)


def test_kl_is_per_sample_mean_per_model() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 3, 4))  # (models, samples, logits)
    t = rng.normal(size=(2, 3, 4))
    want = np.zeros(2)
    for m in range(2):
        tot = 0.0
        for b in range(3):
            ps = np.exp(s[m, b]) / np.exp(s[m, b]).sum()
            pt = np.exp(t[m, b]) / np.exp(t[m, b]).sum()
            tot += float(np.sum(pt * np.log(pt / ps)))
        want[m] = tot / 3  # mean over the 3 samples, not over models
    got = M.kl_per_sample(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert float(M.kl_per_sample(torch.tensor(t), torch.tensor(t)).abs().max()) < 1e-6


def test_student_inits_follow_share_mode_and_derangement() -> None:
    sizes = [64, 8, 8, 13]
    perm = M.derangement(3, 0)
    n_par = 6

    def init(i: int) -> list[torch.Tensor]:
        return M.init_mlp(M.model_seed(0, i, "init"), sizes)

    for share in ("all", "head", "hidden"):
        cfg = M.MnistConfig(models=3, width=8, share=share)
        st = M.student_inits(cfg, perm, sizes)  # arm-major: (4 * 3, ...)
        for i in range(3):
            own, other = init(i), init(int(perm[i]))
            for k in range(n_par):
                head = k >= n_par - 2
                same_src = own if share == "all" or (share == "head") == head else other
                assert torch.equal(st[k][0 * 3 + i], same_src[k])  # student_aux_same
                assert torch.equal(st[k][1 * 3 + i], same_src[k])  # student_all_same
                assert torch.equal(st[k][2 * 3 + i], other[k])  # student_aux_cross: never its own init
                assert torch.equal(st[k][3 * 3 + i], other[k])
    noisy = M.student_inits(M.MnistConfig(models=3, width=8, init_noise=0.05), perm, sizes)
    d = (noisy[0][0] - init(0)[0]).std().item()
    assert 0.04 < d < 0.06


# --------------------------------------------------------------------------------- batched == loop
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"weight_decay": 1e-2, "init_noise": 0.01, "share": "head"},
        {"weight_decay": 1e-2, "decoupled": True, "share": "hidden", "fused_adam": False},
    ],
)
def test_batched_trainer_equals_loop_of_single_models(extra: dict) -> None:
    cfg = M.MnistConfig(
        **{
            **TINY,
            "models": 3,
            "epochs": 1,
            "batch_size": 256,
            "noise_samples": 96,
            "student_batch_size": 32,
            **extra,
        }
    )
    digits = load_digits(cfg.data)
    loop = M.train_separately(cfg, digits)

    sizes = M.layer_sizes(digits.n_features, cfg)
    ids = list(range(cfg.models))
    x = torch.from_numpy(digits.x_train) * 2 - 1
    t_init = M.stack([M.init_mlp(M.model_seed(cfg.seed, i, "init"), sizes) for i in ids])
    teacher, _ = M.train_teacher(t_init, x, torch.from_numpy(digits.y_train), cfg, ids)
    s_init = M.student_inits(cfg, M.derangement(cfg.models, cfg.seed), sizes)
    students, _ = M.train_students(s_init, teacher, t_init, cfg, ids, x.shape[0])

    for a, b in zip(teacher, loop["teacher"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    n = cfg.models
    for k, (arm, _, _) in enumerate(M.STUDENT_ARMS):
        for a, b in zip(students, loop[arm]):
            torch.testing.assert_close(a[k * n : (k + 1) * n], b, rtol=1e-4, atol=1e-5)
    # the students did move
    assert float((students[0] - s_init[0]).abs().max()) > 0


def test_manual_backward_matches_autograd_in_fp32_and_bf16() -> None:
    torch.manual_seed(0)
    sizes = [20, 16, 16, 13]
    params = M.stack([M.init_mlp(M.model_seed(0, i, "init"), sizes) for i in range(6)])
    for p in params[1::2]:
        p.normal_(0, 0.1)  # non-zero biases
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        net = M.BatchedMLP(params, dtype)
        # the activation buffers are reused across calls and kept per batch size and grouping
        for b, groups in ((5, 2), (7, 1), (5, 2), (3, 3)):
            x = torch.randn(6 // groups, b, 20)  # shared by `groups` groups of models
            d = torch.randn(6, b, 13)
            # reference: autograd through the same computation in `dtype` (in bf16 a ReLU whose input
            # rounds across 0 flips its mask, so an fp32 reference differs by more than rounding)
            leaves = [p.to(dtype, copy=True).requires_grad_(True) for p in params]
            want = M.forward(leaves, x.to(dtype).repeat(groups, 1, 1))
            (want.float() * d).sum().backward()
            out = net.forward(x, groups=groups)
            torch.testing.assert_close(out, want.detach().float(), rtol=tol, atol=tol)
            net.backward(d)
            for g, leaf in zip(net.grads_fp32(), leaves):
                assert leaf.grad is not None
                err = (g - leaf.grad.float()).norm() / leaf.grad.float().norm()
                assert float(err) < tol, (dtype, b, groups, float(err))


@pytest.mark.parametrize("decay", [{}, {"weight_decay": 1e-2}, {"weight_decay": 1e-2, "decoupled": True}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_adam_equals_torch_fused_adam(dtype: torch.dtype, decay: dict) -> None:
    """The piecewise update (widen the bf16 gradient, fused Adam kernel, refresh the bf16 weights) is
    bit-for-bit torch.optim.Adam(fused=True) on the fp32 weights with the widened gradients."""
    sizes = [20, 16, 16, 13]
    params = M.stack([M.init_mlp(M.model_seed(0, i, "init"), sizes) for i in range(4)])
    net = M.BatchedMLP(params, dtype)
    opt = M.StackedAdam(net, 1e-2, chunk=64, **decay)  # pieces that cut through models and tensors
    ref = [p.clone() for p in params]
    cls = torch.optim.AdamW if decay.get("decoupled") else torch.optim.Adam
    ref_opt = cls(ref, lr=1e-2, weight_decay=decay.get("weight_decay", 0.0), fused=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for g in net.grads:
            g.copy_(torch.randn(g.shape, generator=gen))
        for r, g in zip(ref, net.grads_fp32()):
            r.grad = g
        opt.step()
        ref_opt.step()
        for p, w, r in zip(net.params, net.weights, ref):
            assert torch.equal(p, r)
            assert torch.equal(w, r.to(dtype))
    # the unfused path (torch.optim's default implementation) agrees to rounding
    net2 = M.BatchedMLP(params, dtype)
    opt2 = M.StackedAdam(net2, 1e-2, fused=False, **decay)
    ref2 = [p.clone() for p in params]
    ref_opt2 = cls(ref2, lr=1e-2, weight_decay=decay.get("weight_decay", 0.0), fused=True)
    for _ in range(2):
        for g in net2.grads:
            g.copy_(torch.randn(g.shape, generator=gen))
        for r, g in zip(ref2, net2.grads_fp32()):
            r.grad = g
        opt2.step()
        ref_opt2.step()
    for p, w, r in zip(net2.params, net2.weights, ref2):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
        assert torch.equal(w, p.to(dtype))


def test_bf16_run_matches_fp32_run(tmp_path: Path) -> None:
    cfg = {**TINY, "width": 32, "epochs": 2, "batch_size": 64, "lr": 3e-3}
    r32 = M.run_mnist(M.MnistConfig(**cfg), tmp_path / "fp32")
    r16 = M.run_mnist(M.MnistConfig(**{**cfg, "precision": "bf16"}), tmp_path / "bf16")
    for arm in M.ARMS:
        a, b = r32["arms"][arm]["accuracy"]["mean"], r16["arms"][arm]["accuracy"]["mean"]
        assert abs(a - b) < 0.05, (arm, a, b)


def test_model_results_do_not_depend_on_batch_composition() -> None:
    cfg = M.MnistConfig(**TINY)
    digits = load_digits(cfg.data)
    sizes = M.layer_sizes(digits.n_features, cfg)
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    full, _ = M.train_teacher(
        M.stack([M.init_mlp(M.model_seed(0, i, "init"), sizes) for i in (0, 1, 2)]), x, y, cfg, [0, 1, 2]
    )
    alone, _ = M.train_teacher(M.stack([M.init_mlp(M.model_seed(0, 2, "init"), sizes)]), x, y, cfg, [2])
    for a, b in zip(full, alone):
        torch.testing.assert_close(a[2:3], b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- whole run
def test_run_mnist_every_arm_and_outputs(tmp_path: Path) -> None:
    res = M.run_mnist(M.MnistConfig(**TINY), tmp_path)
    assert set(res["arms"]) == set(M.ARMS)
    for arm in M.ARMS:
        acc = res["arms"][arm]["per_model_accuracy"]
        assert len(acc) == 3 and all(0.0 <= v <= 1.0 for v in acc)
        assert res["arms"][arm]["accuracy"]["lo"] is not None
    for arm, _, _ in M.STUDENT_ARMS:
        r = res["arms"][arm]
        assert -1.0 <= r["cos"]["mean"] <= 1.0 and len(r["per_model_cos"]) == 3
        assert len(res["theorem"]["arms"][arm]["cos"]["mean"]) == len(res["theorem"]["step"])
    assert res["theorem"]["step"][0] == 0
    assert res["teacher_train_loss_per_epoch"] and res["derangement"] != [0, 1, 2]
    for name in ("results.json", "report.html", "accuracy.png", "alignment.png", "per_model.csv"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["models"] == 3 and saved["environment"]["packages"]["torch"]
    assert "stratified" in saved["data"]["split"]
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "aux logits" in html
    header, rows = M.accuracy_table(saved)
    assert len(rows) == len(M.ARMS) and len(header) == len(rows[0])


def test_a_run_killed_while_drawing_leaves_the_previous_figures_whole(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun into a finished run's directory, stopped while it draws a figure (the kill campaign's window:
    tests/test_kill_campaign.py), leaves the earlier PNG complete beside the earlier results.json: figures are
    rendered in memory and written atomically (savefig used to write straight to the path)."""
    import matplotlib.figure

    M.run_mnist(M.MnistConfig(**TINY), tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in ("accuracy.png", "alignment.png", "results.json")}
    real = matplotlib.figure.Figure.savefig

    def killed_mid_write(self: Any, fname: Any, *a: Any, **kw: Any) -> None:
        real(self, fname, *a, **kw)
        if isinstance(fname, (str, os.PathLike)):  # written straight to the final path: cut it as a kill would
            p = Path(fname)
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        M.run_mnist(M.MnistConfig(**TINY), tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_teacher_learns_digits(tmp_path: Path) -> None:
    """A sanity check at tiny size: the trained teacher beats chance clearly, the reference does not."""
    res = M.run_mnist(
        M.MnistConfig(**{**TINY, "width": 32, "epochs": 3, "batch_size": 64, "lr": 3e-3}), tmp_path
    )
    assert res["arms"]["teacher"]["accuracy"]["mean"] > 0.5
    assert res["arms"]["reference"]["accuracy"]["mean"] < 0.35


# ---------------------------------------------------------------------------------------------- CLI
CLI_TINY = [
    "--data",
    "sklearn",
    "--models",
    "2",
    "--width",
    "8",
    "--epochs",
    "1",
    "--noise-samples",
    "64",
    "--batch-size",
    "256",
    "--curve-points",
    "2",
    "--no-progress",
]


def test_cli_runs_and_writes_outputs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sublim.toy.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["mnist", *CLI_TINY, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "results.json").exists() and (out / "report.html").exists()
    assert "report:" in r.output and "teacher" in r.output


def test_cli_mounted_as_subcommand(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from sublim.toy.cli import app as toy_app

    root = typer.Typer()

    @root.callback()
    def _root() -> None:
        pass

    root.add_typer(toy_app, name="toy")
    runner = CliRunner()
    r = runner.invoke(root, ["toy", "mnist", *CLI_TINY, "--share", "head", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "results.json").read_text())["config"]["share"] == "head"
    assert runner.invoke(root, ["toy", "--help"]).exit_code == 0
    bad = runner.invoke(
        root, ["toy", "mnist", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "missing.npz" in bad.output
    bad = runner.invoke(root, ["toy", "mnist", "--models", "1", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "models" in bad.output


def test_cli_defaults_match_config_defaults() -> None:
    from sublim.toy.cli import mnist

    fields = M.MnistConfig.model_fields
    for name, p in inspect.signature(mnist).parameters.items():
        if name in fields:
            assert p.default == fields[name].default, name


def test_auto_threads_measures_other_work_now(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Busy cores come from two /proc/stat snapshots; one thread when others keep half a core busy."""
    stat = tmp_path / "stat"
    snaps = iter(
        [
            "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n",  # total 1000, idle (+iowait) 850
            "cpu  300 0 100 1500 100 0 0 0 0 0\ncpu0 1 2 3\n",  # +1000 total, +750 idle: 25% busy
        ]
    )

    def read() -> tuple[int, int]:
        stat.write_text(next(snaps))
        return M._cpu_times(str(stat))

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert M.busy_cores(0.0, read) == pytest.approx(0.5)
    assert M.auto_threads(busy=0.5) == 1
    assert M.auto_threads(busy=0.1) == torch.get_num_threads()
    # a counter that did not move, or no /proc/stat: None, and auto_threads falls back to the load average
    assert M.busy_cores(0.0, lambda: (5, 5)) is None

    def missing() -> tuple[int, int]:
        return M._cpu_times(str(tmp_path / "absent"))

    assert M.busy_cores(0.0, missing) is None
    if Path("/proc/stat").exists():
        measured = M.busy_cores(0.05)
        assert measured is not None and 0.0 <= measured <= (os.cpu_count() or 1)
