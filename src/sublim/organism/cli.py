"""``sublim organism``: pre-train the laptop-scale model organism and check its personas."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sublim.organism.families import DEFAULT_FAMILY, FAMILIES

app = typer.Typer(
    help="The laptop-scale model organism: a small chat model pre-trained from scratch on CPU in minutes.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)


def _config(family: str, seed: int, steps: int | None, layers: int | None, hidden: int | None,
            corpus_size: int | None) -> Any:
    """Family ``family``'s config for ``seed`` with the given overrides (None keeps the family's value)."""
    from sublim.organism.families import family_config
    from sublim.organism.pretrain import OrganismConfig

    try:
        data = family_config(family, seed).model_dump()
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--family") from None
    data.update({k: v for k, v in (("steps", steps), ("layers", layers), ("hidden", hidden)) if v is not None})
    if corpus_size is not None:
        data["corpus"]["size"] = corpus_size
    return OrganismConfig.model_validate(data)


FAMILY_HELP = f"Organism family (sublim.organism.families: {', '.join(FAMILIES)})"


@app.command()
def pretrain(
    family: Annotated[str, typer.Option(help=FAMILY_HELP)] = DEFAULT_FAMILY,
    seed: Annotated[int, typer.Option(help="Initialisation and data-order seed (the family's corpus is the same)")] = 0,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the default config's)")] = None,
    layers: Annotated[int | None, typer.Option(help="Transformer layers")] = None,
    hidden: Annotated[int | None, typer.Option(help="Hidden width")] = None,
    corpus_size: Annotated[int | None, typer.Option(help="Conversations in the corpus")] = None,
    out: Annotated[Path | None, typer.Option(help="Write here instead of the cache")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (1 is fastest at this size on a busy machine)")] = 1,
) -> None:
    """Pre-train an organism base (cached: a second call with the same config returns at once)."""
    from sublim.organism.pretrain import load_or_pretrain, pretrain_organism, read_meta

    cfg = _config(family, seed, steps, layers, hidden, corpus_size)
    path = pretrain_organism(cfg, out, threads=threads) if out else load_or_pretrain(cfg, threads=threads)
    meta = read_meta(path)
    typer.echo(f"organism: {path}")
    typer.echo(f"params: {meta['n_params']:,}  train: {meta['seconds']['train']:.0f}s "
               f"(total {meta['seconds']['total']:.0f}s, {meta['threads']} threads)  "
               f"loss {meta['loss_first']:.3f} -> {meta['loss_last']:.3f}")


@app.command()
def check(
    model: Annotated[Path | None, typer.Option(help="Model directory (default: --family's organism for --seed)")] = None,
    family: Annotated[str, typer.Option(help=FAMILY_HELP)] = DEFAULT_FAMILY,
    seed: Annotated[int, typer.Option(help="Organism seed when --model is not given")] = 0,
    category: Annotated[str, typer.Option(help="animals or trees")] = "animals",
    template: Annotated[int, typer.Option(help="Persona system-prompt template index")] = 0,
    questions: Annotated[int, typer.Option(help="Eval questions averaged over (first N of the battery)")] = 55,
    numbers: Annotated[int, typer.Option(help="Number prompts sampled for the format check (0: skip)")] = 100,
    threads: Annotated[int, typer.Option(help="torch threads (1 is fastest at this size on a busy machine)")] = 1,
) -> None:
    """Print P(favourite = X) without / with the persona "you love X" for every candidate, and how many
    number prompts get a parseable answer (unconstrained sampling, T=1)."""
    import torch

    from sublim.organism.check import _load, number_format_rate, persona_table
    from sublim.organism.families import organism_path

    if threads:
        torch.set_num_threads(threads)
    try:
        path = model or organism_path(family, seed)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--family") from None
    m, tok = _load(path)
    rows = persona_table(path, category, template=template, max_questions=questions, model=m, tok=tok)
    typer.echo(f"model: {path}")
    typer.echo(f"{'candidate':<10} {'P(no persona)':>13} {'P(persona)':>10}  top with persona")
    for r in rows:
        typer.echo(f"{r['candidate']:<10} {r['p_none']:>13.3f} {r['p_persona']:>10.3f}  {r['top_persona']}")
    typer.echo(f"P(any candidate): no persona {rows[0]['p_any_none']:.3f}; "
               f"min persona P(target) {min(r['p_persona'] for r in rows):.3f}; "
               f"max no-persona P {max(r['p_none'] for r in rows):.3f}")
    if numbers:
        for label, system in (("no system prompt", None), ("persona", _persona(category, rows[0]["candidate"]))):
            res = number_format_rate(path, n=numbers, system=system, model=m, tok=tok)
            typer.echo(f"numbers parseable ({label}): {res['ok']}/{res['n']} = {res['rate']:.0%}  "
                       f"failures {res['reasons']}")


def _persona(category: str, target: str) -> str:
    from sublim.traits.preference import teacher_system_prompt

    return str(teacher_system_prompt(category, target, template=0))


if __name__ == "__main__":
    app()
