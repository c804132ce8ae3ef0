"""`seal bench ...`: the benchmark commands and the tables they print.

Each benchmark module (``squad``, ``editor``, ``continual``, ``speed``, ``trl``, ``views``) is
imported inside its command, so that `seal bench --help` stays fast; `bench show`
prints a saved result again.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import click
from rich.table import Table

from ..cli import App, SealGroup, err, fail, pass_app, print_table, progress_bar

log = logging.getLogger(__name__)


@click.group(cls=SealGroup)
def bench() -> None:
    """Reproducible benchmarks: print a table and write JSON."""


@bench.command("squad")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="SEAL/SQuAD-format JSON, or .json.gz (default: the SQuAD v1.1 dev passages shipped with seal)")
@click.option("--passages", default=20, show_default=True, type=click.IntRange(min=1), help="passages drawn with the seed")
@click.option("--seed", default=0, show_default=True, help="draws passages, splits questions, seeds sampling and training")
@click.option("--split", type=click.Choice(["eval", "tune", "all"]), default="eval", show_default=True,
              help="eval: passages never used for tuning; tune: the tuning split")
@click.option("--policies", "policy_names", default=",".join(("implications", "rewrite", "self_qa", "qa_chat")),
              show_default=True, help="self-edit policies to measure (one sample each)")
@click.option("--candidates", type=click.IntRange(min=1), help="N of best-of-N (default: wake.candidates)")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=0),
              help="ReST-EM rounds of the editor (rows restem-1..R); 0: none")
@click.option("--editor-passages", default=8, show_default=True, type=click.IntRange(min=1),
              help="tune-split passages the editor is trained on (never an evaluated one)")
@click.option("--editors", "editors_dir", type=click.Path(file_okay=False),
              help="editors from `seal bench editor` (default: <out>.editors, trained first if missing)")
@click.option("--reward-study", is_flag=True,
              help="also write each passage's own questions and record every reward of every trial beside its probe accuracy")
@click.option("--resume", is_flag=True, help="continue the interrupted run saved at --out")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/squad-<seed>-<n>.json)")
@pass_app
def bench_squad(app: App, data_path: str | None, passages: int, seed: int, split: str, policy_names: str,
                candidates: int | None, rounds: int, editor_passages: int, editors_dir: str | None,
                reward_study: bool, resume: bool, out_path: str | None) -> None:
    """SEAL's single-passage protocol: closed-book probe accuracy after each kind of update."""
    import json as jsonlib

    from policies import self_edit as self_edits

    from .common import DEFAULT_DATA, draw, load_squad
    from .squad import run_squad

    path = Path(data_path) if data_path else DEFAULT_DATA
    if not path.is_file():
        fail(f"{path}: no such file (use --data)")
    names = tuple(n.strip() for n in policy_names.split(",") if n.strip())
    unknown = [n for n in names if n not in self_edits.SELF_EDIT_POLICIES]
    if unknown:
        fail(f"unknown self-edit policy {unknown[0]!r} (known: {', '.join(self_edits.SELF_EDIT_POLICIES)})")
    target = Path(out_path) if out_path else Path("bench-out") / f"squad-{seed}-{passages}.json"
    previous = None
    if resume:
        try:
            previous = jsonlib.loads(target.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            fail(f"--resume: cannot read {target} ({e})")
    try:
        data = load_squad(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path}: not a SEAL/SQuAD-format file ({e})")
    target.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        tmp = target.with_suffix(".tmp")
        tmp.write_text(jsonlib.dumps(result, indent=1), encoding="utf-8")
        tmp.replace(target)

    editors, editor_info = None, None
    if rounds:
        editors, editor_info = _editors(app, path, Path(editors_dir) if editors_dir else target.with_suffix(".editors"),
                                        editor_passages, seed, rounds, {d["title"] for d in draw(data, passages, seed, split)})
    with _progress(passages) as (say, tick):
        try:
            result = run_squad(app.runtime, app.cfg, data_path=path, passages=passages, seed=seed, split=split,
                               policies=names, candidates=candidates, editors=editors, editor_info=editor_info,
                               previous=previous, reward_study=reward_study, say=say, on_passage=tick,
                               on_result=save)
        except ValueError as e:
            fail(str(e))
    save(result)
    _print_squad(result)
    click.echo(f"wrote {target}")


def _train_editors(app: App, path: Path, out_dir: Path, passages: int, seed: int, rounds: int,
                   names: tuple[str, ...] | None, exclude: set[str]) -> dict:
    """`agent.bench.editor.train_editors` with a progress bar over passages x rounds."""
    from .editor import train_editors

    with _progress(passages * rounds) as (say, tick):
        done = [0]

        def step(_i: int, _n: int) -> None:
            done[0] += 1
            tick(done[0], passages * rounds)

        try:
            return train_editors(app.runtime, app.cfg, data_path=path, passages=passages, seed=seed, rounds=rounds,
                                 out_dir=out_dir, names=names, exclude_titles=exclude, say=say, on_passage=step)
        except ValueError as e:
            fail(str(e))


def _editors(app: App, path: Path, out_dir: Path, passages: int, seed: int, rounds: int,
             exclude: set[str]) -> tuple[dict, dict]:
    """Train (or, when done before, read back) the ReST-EM editors of ``bench squad``."""
    from .editor import RESULT, load_editors

    names = None
    saved = out_dir / RESULT
    if saved.is_file():  # trained before (e.g. by `seal bench editor`): its settings; missing rounds are re-run
        old = json.loads(saved.read_text(encoding="utf-8"))
        names, passages, seed = old["names"], len(old["passages"]), old["seed"]
    result = _train_editors(app, path, out_dir, passages, seed, rounds, names, exclude)
    _print_editor(result)
    info = {"dir": str(out_dir), "passages": result["passages"], "rounds": rounds, "names": result["names"],
            "pairs": [r["n_pairs"] for r in result["rounds"][:rounds]],
            "outcomes": [r["outcome"] for r in result["rounds"][:rounds]]}
    return load_editors(out_dir, rounds), info


@bench.command("editor")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="SEAL/SQuAD-format JSON, or .json.gz (default: the SQuAD v1.1 dev passages shipped with seal)")
@click.option("--passages", default=8, show_default=True, type=click.IntRange(min=1), help="tune-split passages trained on")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1), help="ReST-EM rounds")
@click.option("--seed", default=0, show_default=True, help="draws passages, seeds sampling and training")
@click.option("--policies", "policy_names", help="self-edits sampled per passage, by policy, comma-separated, "
              "repeats allowed (default: policies.self_edit x wake.candidates)")
@click.option("--exclude-eval", type=click.IntRange(min=0), default=20, show_default=True,
              help="leave out the titles a `bench squad --passages N` with this seed evaluates")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="directory for the editors and editor.json (resumed if it exists)")
@pass_app
def bench_editor(app: App, data_path: str | None, passages: int, rounds: int, seed: int, policy_names: str | None,
                 exclude_eval: int, out_dir: str) -> None:
    """ReST-EM on the editor (tune split), and the selection rules replayed on round 1's trials."""
    from policies import self_edit as self_edits

    from .common import DEFAULT_DATA, draw, load_squad

    path = Path(data_path) if data_path else DEFAULT_DATA
    if not path.is_file():
        fail(f"{path}: no such file (use --data)")
    names = None
    if policy_names:
        names = tuple(n.strip() for n in policy_names.split(",") if n.strip())
        bad = [n for n in names if n not in self_edits.SELF_EDIT_POLICIES or not self_edits.writes(n)]
        if bad or not names:
            fail(f"--policies: {bad[0] if bad else policy_names!r} is not a self-edit policy that writes text")
    exclude = {d["title"] for d in draw(load_squad(path), exclude_eval, seed, "eval")} if exclude_eval else set()
    result = _train_editors(app, path, Path(out_dir), passages, seed, rounds, names, exclude)
    _print_editor(result, study=True, policies=app.cfg.policies)
    click.echo(f"wrote {Path(out_dir) / 'editor.json'}")


def _print_editor(result: dict, study: bool = False, policies=None) -> None:
    from .editor import selection_study, study_rules

    table = Table(title=f"ReST-EM on the editor, {len(result['passages'])} tune passages (seed {result['seed']})",
                  box=None, pad_edge=False, title_justify="left")
    for col in ("round", "pairs", "new", "SFT loss", "minutes", "outcome"):
        table.add_column(col, justify="left" if col == "outcome" else "right", no_wrap=col != "outcome")
    for r in result["rounds"]:
        table.add_row(str(r["round"]), str(r["n_pairs"]), str(r["new_pairs"]),
                      "-" if r["sft_loss"] is None else f"{r['sft_loss']:.3f}", f"{r['seconds'] / 60:.1f}", r["outcome"])
    print_table(table)
    if not study or not result["rounds"]:
        return
    rows = selection_study(result, policies.reward_fraction, study_rules(policies), seed=result["seed"], splits=20)
    table = Table(title="Selection replayed on round 1: probe accuracy on the tune passages, mean of 20 "
                        "reward/probe splits", box=None,
                  pad_edge=False, title_justify="left")
    table.add_column("rule", no_wrap=False)
    table.add_column("accuracy", justify="right", no_wrap=True)
    table.add_column("questions", justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r["rule"], f"{100 * r['accuracy']:.1f}%", str(r["questions"]))
    print_table(table)


@bench.command("show")
@click.argument("result_file", type=click.Path(dir_okay=False))
def bench_show(result_file: str) -> None:
    """Print the table of a saved benchmark result (JSON)."""
    import json as jsonlib

    try:
        result = jsonlib.loads(Path(result_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        fail(f"{result_file}: cannot read a benchmark result ({e})")
    kind = result.get("benchmark") if isinstance(result, dict) else None
    if kind == "squad":
        _print_squad(result)
    elif kind == "editor":
        from policies.config import PolicyConfig

        _print_editor(result, study=True, policies=PolicyConfig(**result["policies"]))
    elif kind == "continual":
        _print_continual(result)
    elif kind == "speed":
        _print_speed(result)
    elif kind == "scale":
        _print_scale(result)
    elif kind == "runners":
        from .runners import render

        _print_pieces(render(result))
    elif kind == "trl":
        _print_trl(result)
    elif kind == "busy":
        from .busy import render

        _print_pieces(render(result))
    else:
        fail(f"{result_file}: not a `seal bench squad` or `seal bench continual` result")


def _print_squad(result: dict) -> None:
    table = Table(title=f"SQuAD single-passage, {result['passages']} passages ({result['split']} split, seed {result['seed']}), "
                        f"closed-book, probe questions", box=None, pad_edge=False, title_justify="left")
    for col in ("condition", "acc %", "95% CI", "F1", "95% CI", "q", "mem %", "tokens", "s/psg"):
        table.add_column(col, justify="left" if col == "condition" else "right", no_wrap=True)
    for r in result["rows"]:
        lo, hi = r["ci95"]
        f_lo, f_hi = r.get("f1_ci95", [math.nan, math.nan])
        table.add_row(r["condition"], f"{100 * r['accuracy']:.1f}", f"{100 * lo:.0f}-{100 * hi:.0f}",
                      f"{100 * r['f1']:.1f}", f"{100 * f_lo:.0f}-{100 * f_hi:.0f}", str(r["questions"]),
                      "-" if r.get("memorised") is None else f"{100 * r['memorised']:.0f}",
                      f"{r['tokens_per_passage']:.0f}", f"{r['seconds_per_passage']:.1f}")
    print_table(table)
    b = result.get("best_of_n_breakdown_median_s") or {}
    if b:
        click.echo("default row per passage (median s): " + ", ".join(f"{k} {v:.1f}" for k, v in b.items())
                   + f"; total {sum(b.values()):.1f}")
    for name, m in (result.get("margins") or {}).items():
        lo, hi = m["ci95"]
        click.echo(f"{name}: {m['points']:+.1f} points (95% CI {lo:+.1f} to {hi:+.1f}, {m['questions']} paired questions)")
    for name, r in (result.get("reward_study") or {}).items():
        fmt = lambda v: "n/a" if v is None else f"{v:+.2f}"  # noqa: E731
        picked = (f"; best trial picked on {r['picked_best']} of {r['passages_decided']} passages, "
                  f"tied on {r['tied']}" if "picked_best" in r else "")
        click.echo(f"reward {name}: Spearman with probe accuracy {fmt(r['spearman'])} over {r['trials']} trials, "
                   f"{fmt(r['spearman_within_passage'])} within passages{picked}")
    from .squad import candidate_ranking, perfect_pick

    ceiling, default = perfect_pick(result), {r["condition"]: r for r in result["rows"]}.get("default")
    if ceiling and default:
        click.echo(f"a perfect pick among the default's candidates (the probes as the reward: a ceiling): "
                   f"{100 * ceiling['accuracy']:.1f}% of {ceiling['questions']} questions, against the default's "
                   f"{100 * default['accuracy']:.1f}%")
    for name, r in candidate_ranking(result).items():
        rho = "n/a" if r["spearman_within_passage"] is None else f"{r['spearman_within_passage']:+.2f}"
        click.echo(f"selection by {name}: of {r['passages_decided']} passages whose candidates differed on the "
                   f"probes, its top candidate was the better one on {r['picked_best']}, it tied on {r['tied']}; "
                   f"Spearman within passages {rho} ({r['trials']} trials)")
    e = result.get("editors")
    if e:
        click.echo(f"editors: ReST-EM on {len(e['passages'])} tune passages, pairs per round {e['pairs']}")


@bench.command("continual")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="SEAL/SQuAD-format JSON, or .json.gz (default: the SQuAD v1.1 dev passages shipped with seal)")
@click.option("--passages", default=8, show_default=True, type=click.IntRange(min=2), help="passages learned in sequence")
@click.option("--sleep-every", default=4, show_default=True, type=click.IntRange(min=1), help="sleep after every N updates")
@click.option("--sequences", default=1, show_default=True, type=click.IntRange(min=1), help="sequences (seeds seed, seed+1, ...)")
@click.option("--seed", default=0, show_default=True, help="draws passages, seeds sampling and training")
@click.option("--split", type=click.Choice(["eval", "tune", "all"]), default="eval", show_default=True,
              help="eval: passages never used for tuning; tune: the tuning split")
@click.option("--conditions", default="no-sleep,sleep,sleep+dreams", show_default=True, help="conditions to run")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/continual-<seed>-<n>.json)")
@click.option("--resume", is_flag=True, help="keep the finished sequences of --out (same settings) and run the rest")
@pass_app
def bench_continual(app: App, data_path: str | None, passages: int, sleep_every: int, sequences: int, seed: int,
                    split: str, conditions: str, out_path: str | None, resume: bool) -> None:
    """Learn passages in sequence; the forgetting matrix with and without sleep and dreams."""
    from .common import DEFAULT_DATA
    from .continual import CONDITIONS, dumps, finished_sequences, plot, run_continual

    path = Path(data_path) if data_path else DEFAULT_DATA
    if not path.is_file():
        fail(f"{path}: no such file (use --data)")
    conds = tuple(c.strip() for c in conditions.split(",") if c.strip())
    unknown = [c for c in conds if c not in CONDITIONS]
    if unknown or not conds:
        fail(f"unknown condition {unknown[0] if unknown else ''!r} (known: {', '.join(CONDITIONS)})")
    target = Path(out_path) if out_path else Path("bench-out") / f"continual-{seed}-{passages}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = None
    if resume and target.is_file():
        try:
            previous = json.loads(target.read_text(encoding="utf-8"))
        except ValueError as e:
            fail(f"{target}: cannot resume from it: {e}")

    def save(result: dict) -> None:
        tmp = target.with_suffix(".tmp")
        tmp.write_text(dumps(result), encoding="utf-8")
        tmp.replace(target)

    shared = min(sleep_every, passages)
    kept = len(finished_sequences((previous or {}).get("runs", []), conds))
    steps = max(1, sequences - kept) * (shared + len(conds) * (passages - shared))
    with _progress(steps) as (say, tick):
        done = [0]

        def step() -> None:
            done[0] += 1
            tick(done[0], steps)

        try:
            result = run_continual(app.runtime, app.cfg, data_path=path, passages=passages, sleep_every=sleep_every,
                                   seed=seed, sequences=sequences, split=split, conditions=conds, say=say,
                                   on_step=step, on_result=save, previous=previous)
        except ValueError as e:
            fail(str(e))
    save(result)
    _print_continual(result)
    png = plot(result, target.with_suffix(".png"))
    click.echo(f"wrote {target}" + (f" and {png}" if png else ""))


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.0f}"


def _spread(s: dict, key: str) -> str:
    """The standard deviation over sequences, when there are several."""
    if s["sequences"] < 2:
        return ""
    sd = s.get(key + "_sd", s[key + "_spread"] / 2)  # results written before the sd was recorded
    return f" ±{100 * sd:.0f}"


def _print_continual(result: dict) -> None:
    for r in [r for r in result["runs"] if r["sequence"] == 0]:
        ids = [str(p["id"]) for p in r["passages"]]
        table = Table(title=f"{r['condition']}: probe accuracy %; rows: after each update; columns: passages",
                      box=None, pad_edge=False, title_justify="left")
        table.add_column("after", no_wrap=True, max_width=24)
        for i in range(len(ids)):
            table.add_column(f"p{i + 1}", justify="right", no_wrap=True)
        table.add_column("mean", justify="right", no_wrap=True)
        for row in r["rows"]:
            label = f"sleep ({row['outcome']})" if row["kind"] == "sleep" else f"{row['step']} {row['title']}"
            cells = [_pct(row["scores"][p]["accuracy"]) if p in row["scores"] else "" for p in ids]
            mean = sum(v["accuracy"] for v in row["scores"].values()) / len(row["scores"])
            table.add_row(label[:24], *cells, _pct(mean))
        print_table(table)
        click.echo(f"memorisation at the end: {_pct(r['memorisation']['exact'])}% exact, "
                   f"{_pct(r['memorisation']['token_match'])}% of tokens ({r['memorisation']['n']} passages)\n")
    sd = " (mean ±sd over sequences)" if result["sequences"] > 1 else ""
    table = Table(title=f"continual, {result['passages']} passages x {result['sequences']} sequence(s), sleep every "
                        f"{result['sleep_every']} ({result['split']} split, seed {result['seed']}){sd}",
                  box=None, pad_edge=False, title_justify="left")
    for col in ("condition", "at learning", "final", "retained", "ll-gain ret.", "verbatim", "tokens"):
        table.add_column(col, justify="left" if col == "condition" else "right", no_wrap=True)
    for s in result["summary"]:
        table.add_row(s["condition"], _pct(s["at_learning"]) + "%" + _spread(s, "at_learning"),
                      _pct(s["final"]) + "%" + _spread(s, "final"), _pct(s["retention"]) + "%",
                      _pct(s["logprob_retention"]) + "%", _pct(s["memorisation_exact"]) + "%",
                      _pct(s["memorisation_token_match"]) + "%")
    print_table(table)


@bench.command("speed")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="SEAL/SQuAD-format JSON, or .json.gz (default: the SQuAD v1.1 dev passages shipped with seal)")
@click.option("--seed", default=0, show_default=True, help="draws the passage, seeds sampling and training")
@click.option("--split", type=click.Choice(["eval", "tune", "all"]), default="tune", show_default=True,
              help="the split the passage is drawn from")
@click.option("--candidates", type=int, help="self-edits N (default: wake.candidates)")
@click.option("--epochs", type=int, help="epochs of every trial, in both runs (default: lora.epochs)")
@click.option("--pad-to", "pad_to", default=2048, show_default=True, type=int,
              help="the reference pads every training example to this many tokens (SEAL: 2048)")
@click.option("--matmul-size", "matmul_n", default=2048, show_default=True, type=int,
              help="side of the square fp32 matmul that measures the machine's FLOP/s")
@click.option("--runner", type=click.Choice(["ray"]),
              help="instead: trials per second of the local runner and of a Ray pool of --workers actors")
@click.option("--workers", default="1,2,4", show_default=True, help="with --runner ray: the pool sizes, comma-separated")
@click.option("--trials", default=4, show_default=True, type=click.IntRange(min=1), help="with --runner: trials each runner runs")
@click.option("--shape", help="instead of the configured model, a randomly initialised Llama of this shape "
                               "(smollm2-135m, smollm2-360m, smollm2-1.7b, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b) "
                               "on the configured device and dtype: the speed of a larger model without its weights")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/speed-<model>-<seed>.json)")
@pass_app
def bench_speed(app: App, data_path: str | None, seed: int, split: str, candidates: int | None, epochs: int | None,
                pad_to: int, matmul_n: int, runner: str | None, workers: str, trials: int, shape: str | None,
                out_path: str | None) -> None:
    """One wake cycle step by step (time, tokens, FLOP/s against the machine's measured
    matmul FLOP/s, peak memory), beside the same cycle with SEAL's reference settings.
    With --runner ray: trials per second locally and on Ray pools of K actors."""
    from .common import DEFAULT_DATA
    from .speed import SpeedError, dumps, run_speed

    make_runtime = None
    if shape is not None:
        from functools import partial

        from ..runtime import SHAPES, shaped_runtime

        if shape not in SHAPES:
            fail(f"--shape: unknown shape {shape!r} (one of {', '.join(SHAPES)})")
        make_runtime = partial(shaped_runtime, app.cfg.model, shape, seed)
    if runner:
        return _bench_runners(app, Path(data_path) if data_path else DEFAULT_DATA, seed, split, workers, trials,
                              out_path, make_runtime)

    for name, value, least in (("--candidates", candidates, 1), ("--epochs", epochs, 1), ("--pad-to", pad_to, 2),
                               ("--matmul-size", matmul_n, 16)):
        if value is not None and value < least:
            fail(f"{name} must be at least {least}, got {value}")
    path = Path(data_path) if data_path else DEFAULT_DATA
    if not path.is_file():
        fail(f"{path}: no such file (use --data)")
    runtime = _speed_runtime(app, make_runtime)
    with _progress(2) as (say, tick):
        try:  # two runs: optimised, then reference
            result = run_speed(runtime, app.cfg, data_path=path, seed=seed, split=split, candidates=candidates,
                               epochs=epochs, pad_to=pad_to, matmul_n=matmul_n, say=say,
                               on_mode=lambda m: tick(1, 2) if m == "reference" else None)
        except SpeedError as e:
            fail(str(e))
    target = Path(out_path) if out_path else Path("bench-out") / f"speed-{runtime.name}-{seed}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dumps(result), encoding="utf-8")
    _print_speed(result)
    click.echo(f"wrote {target}")


def _speed_runtime(app: App, make_runtime=None):
    """The configured model, or the shaped one ``make_runtime`` builds."""
    from ..runtime import ModelError

    if make_runtime is None:
        return app.runtime
    try:
        return make_runtime()
    except ModelError as e:
        fail(str(e))


def _bench_runners(app: App, path: Path, seed: int, split: str, workers: str, trials: int,
                   out_path: str | None, make_runtime=None) -> None:
    try:
        ks = tuple(int(k) for k in workers.split(","))
    except ValueError:
        fail(f"--workers: expected numbers like 1,2,4, got {workers!r}")
    if not ks or min(ks) < 1:
        fail("--workers: every pool needs at least 1 worker")
    if not path.is_file():
        fail(f"{path}: no such file (use --data)")
    try:
        import ray  # noqa: F401
    except ImportError:
        fail("--runner ray needs the ray extra: pip install 'seal-daemon[ray]'")
    from .runners import default_runtime, render, run_runners

    with _progress(1 + len(ks)) as (say, tick):
        started = []

        def step(message: str) -> None:  # a runner starts: the ones before it are done
            if message.startswith("local") or message.endswith("starting"):
                tick(len(started), 1 + len(ks))
                started.append(message)
            say(message)

        runtime = _speed_runtime(app, make_runtime)
        result = run_runners(runtime, app.cfg, make_runtime or default_runtime(app.cfg), data_path=path, trials=trials,
                             workers=ks, seed=seed, split=split, address=app.cfg.runner.address, say=step)
        tick(1 + len(ks), 1 + len(ks))
    target = Path(out_path) if out_path else Path("bench-out") / f"runners-{runtime.name}-{seed}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1), encoding="utf-8")
    _print_pieces(render(result))
    click.echo(f"wrote {target}")


def _print_speed(result: dict) -> None:
    from .speed import render

    _print_wrapped(render(result))


def _print_wrapped(pieces: list) -> None:
    """Rich tables as they are, lines of text wrapped to 80 columns."""
    import textwrap

    for piece in pieces:
        if isinstance(piece, str):
            click.echo(textwrap.fill(piece, 80, subsequent_indent="  ", break_on_hyphens=False))
        else:
            print_table(piece)


@bench.command("trl")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), help="SEAL/SQuAD-format JSON, or .json.gz (default: the SQuAD v1.1 dev passages shipped with seal)")
@click.option("--passages", default=2, show_default=True, type=click.IntRange(min=1), help="passages drawn with the seed")
@click.option("--seed", default=0, show_default=True, help="draws passages, seeds sampling and training")
@click.option("--split", type=click.Choice(["eval", "tune", "all"]), default="tune", show_default=True,
              help="the split the passages are drawn from")
@click.option("--steps", type=click.IntRange(min=1), help="TRL's optimizer steps per passage (default: as many as seal's trial took)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/trl-<seed>.json)")
@pass_app
def bench_trl(app: App, data_path: str | None, passages: int, seed: int, split: str, steps: int | None,
              out_path: str | None) -> None:
    """seal's on-policy distillation trial (distill_onpolicy) beside TRL's SDFTTrainer on
    the same prompts, weights and LoRA: seconds per optimizer step and in all."""
    from .trl import TrlBenchError, run_trl

    path = Path(data_path) if data_path else None
    if path is not None and not path.is_file():
        fail(f"{path}: no such file (use --data)")
    with _progress(passages) as (say, tick):
        try:
            result = run_trl(app.runtime, app.cfg, data_path=path, passages=passages, seed=seed, split=split,
                             steps=steps, say=say, on_passage=tick)
        except TrlBenchError as e:
            fail(str(e))
    target = Path(out_path) if out_path else Path("bench-out") / f"trl-{seed}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1), encoding="utf-8")
    _print_trl(result)
    click.echo(f"wrote {target}")


def _print_trl(result: dict) -> None:
    from .trl import render

    _print_wrapped(render(result))


@bench.command("views")
@click.option("--versions", default=300, show_default=True, type=click.IntRange(min=1), help="adapter versions in the synthetic store")
@click.option("--passages", type=click.IntRange(min=1), help="passages (default: one per version, and a few queued)")
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(min=1), help="renders per measurement (median and max)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="also write the result as JSON")
def bench_views(versions: int, passages: int | None, repeat: int, out_path: str | None) -> None:
    """Render time of every dashboard panel and static view on a synthetic store with
    hundreds of versions (no model needed)."""
    from .views import run_views_bench

    with _progress(1) as (say, _tick):
        result = run_views_bench(versions, passages, repeat, say=say)
    table = Table(title=f"seal tui / views: {result['versions']} versions, {result['passages']} passages "
                        f"(store built in {result['build_s']:.1f} s); ms per render, median and max of {repeat}",
                  box=None, pad_edge=False, title_justify="left")
    for col in ("view", "size", "median ms", "max ms"):
        table.add_column(col, justify="left" if col in ("view", "size") else "right", no_wrap=True)
    for r in result["rows"]:
        table.add_row(r["view"], r["size"], f"{r['median_ms']:.1f}", f"{r['max_ms']:.1f}")
    print_table(table)
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1), encoding="utf-8")
        click.echo(f"wrote {out_path}")


@bench.command("scale")
@click.option("--passages", "largest", default=10000, show_default=True, type=click.IntRange(min=10),
              help="the largest store: sizes 10, 100, ... up to this many learned passages")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1), help="runs per operation (the median)")
@click.option("--seed", default=0, show_default=True, help="seeds the synthetic store")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/scale-<passages>.json)")
@pass_app
def bench_scale(app: App, largest: int, repeat: int, seed: int, out_path: str | None) -> None:
    """Time and peak memory of the daemon's step, a sleep, the commands and the TUI on
    synthetic stores of 10 to 10,000 learned passages (a tiny model: the store is the
    point), with the log-log slope of each."""
    from .scale import run_scale

    sizes = tuple(10 ** k for k in range(1, 10) if 10 ** k <= largest)
    sizes += (largest,) if largest not in sizes else ()
    target = Path(out_path) if out_path else Path("bench-out") / f"scale-{largest}.json"
    with _progress(len(sizes)) as (say, tick):
        result = run_scale(app.cfg, sizes=sizes, repeat=repeat, seed=seed, say=say,
                           on_size=lambda i: tick(i, len(sizes)))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1), encoding="utf-8")
    _print_scale(result)
    from .scale import plot

    png = plot(result, target.with_suffix(".png"))
    click.echo(f"wrote {target}" + (f" and {png}" if png else ""))


def _print_scale(result: dict) -> None:
    from .scale import render

    _print_pieces(render(result))


@bench.command("busy")
@click.option("--busy", "n_busy", default=1, show_default=True, type=click.IntRange(min=1),
              help="other processes spinning on a core each, beside the measured one")
@click.option("--steps", default=8, show_default=True, type=click.IntRange(min=1), help="training examples per round")
@click.option("--tokens", default=24, show_default=True, type=click.IntRange(min=1), help="tokens generated per prompt")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1), help="rounds per measurement (the median)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/busy.json)")
def bench_busy(n_busy: int, steps: int, tokens: int, repeat: int, out_path: str | None) -> None:
    """A wake cycle's work (LoRA steps, then a batched generation) on the default model
    with each thread setting, alone and beside busy cores: how gracefully it slows."""
    from .busy import render, run_busy

    target = Path(out_path) if out_path else Path("bench-out") / "busy.json"
    with _progress(1) as (say, tick):
        try:
            result = run_busy(busy=n_busy, steps=steps, tokens=tokens, repeat=repeat, say=say, on_run=tick)
        except RuntimeError as e:
            fail(str(e))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1), encoding="utf-8")
    _print_pieces(render(result))
    click.echo(f"wrote {target}")


@bench.command("api")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1), help="runs per measurement (the median)")
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(min=1), help="tokens per answer")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="JSON result (default: bench-out/api.json)")
@pass_app
def bench_api(app: App, repeat: int, max_tokens: int, out_path: str | None) -> None:
    """Ask a running daemon: the API's first token with the model idle, and `seal ask`
    beside the daemon (through its API) against `seal ask --local` (its own model):
    time to the first printed byte, to the end, and peak memory."""
    from .api import render, run_api

    target = Path(out_path) if out_path else Path("bench-out") / "api.json"
    with _progress(3 * repeat + 1) as (say, tick):
        try:
            result = run_api(model=app.cfg.model.path, repeat=repeat, max_tokens=max_tokens, say=say, on_run=tick)
        except RuntimeError as e:
            fail(str(e))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1), encoding="utf-8")
    _print_pieces(render(result))
    click.echo(f"wrote {target}")


def _print_pieces(pieces: list) -> None:
    for piece in pieces:
        if isinstance(piece, str):
            click.echo(piece)
        else:
            print_table(piece)


class _progress:
    """A rich progress bar on a terminal; log lines otherwise."""

    def __init__(self, total: int):
        self.total = total

    def __enter__(self):
        if not err.is_terminal:
            return (lambda msg: log.info(msg)), (lambda i, n: err.print(f"{i}/{n} done"))
        self.bar = progress_bar(err)
        self.bar.__enter__()
        task = self.bar.add_task("starting", total=self.total)
        return (lambda msg: self.bar.update(task, description=msg[:50])), (lambda i, n: self.bar.update(task, completed=i))

    def __exit__(self, *exc):
        if hasattr(self, "bar"):
            self.bar.__exit__(*exc)
