"""The `curate` command: thin typer commands that parse options, call the library and print with rich."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .dataset import Dataset
from .stages.bucket import DEFAULT_FAMILY
from .ui import (
    AddressOpt,
    ConfigOpt,
    DatasetArg,
    JsonOpt,
    ManifestOpt,
    console,
    handle_errors,
    print_json,
    progress_bar,
    table,
    warn,
)

app = typer.Typer(
    help="Curate image datasets for LoRA training: scan, check, dedupe, filter, tag, caption, split, "
    "bucket, export, plan, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command groups living in their own modules; each defines register(app).
PLUGINS: list[str] = [
    "curate.commands.clip",
    "curate.commands.tag",
    "curate.commands.export",
    "curate.commands.train",
    "curate.commands.decide",
    "curate.commands.lora_tools",
    "curate.commands.review",
]


def _open(
    path: str,
    manifest: str | None,
    config: str | None,
    create: bool = True,
    *,
    write: bool = True,
    rebuild: bool = False,
) -> Dataset:
    return Dataset.open(path, manifest=manifest, config=config, create=create, write=write, rebuild=rebuild)


@app.callback()
def _global_options(
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            envvar="CURATE_WAIT",
            help="When another curate is writing the same dataset, wait for it instead of stopping "
            "(put it before the command: curate --wait scan DS; or set CURATE_WAIT=1).",
        ),
    ] = False,
) -> None:
    """Curate image datasets for LoRA training."""
    from . import manifest as _manifest

    _manifest.WAIT_FOR_WRITER = wait


def _do_scan(ds: Dataset, as_json: bool, engine: str = "local", address: str | None = None) -> dict:
    with progress_bar("scan", enabled=not as_json) as bar:
        res = ds.scan(progress=bar, engine=engine, address=address)
    return res.as_dict()


def _print_scan(d: dict) -> None:
    rows = [
        ("files", d["total_files"]),
        ("read", d["scanned"]),
        ("new images decoded", d["decoded"]),
        ("unchanged (skipped)", d["unchanged"]),
        ("missing since last scan", d["missing"]),
        *(
            (("changed since last scan (run filter and dedupe again)", d["changed"]),)
            if d.get("changed")
            else ()
        ),
        *((("moved (their rejects and decisions follow)", d["moved"]),) if d.get("moved") else ()),
        *((("changed, kept their train/val side", d["split_kept"]),) if d.get("split_kept") else ()),
        *((f"error: {k}", v) for k, v in sorted(d["errors"].items())),
        *_caption_rows(d.get("captions") or {}),
        ("seconds", f"{d['seconds']:.2f}"),
    ]
    console.print(table("scan", ["", "count"], rows))
    for note in d.get("split_notes") or []:
        warn(note)
    links = d.get("linked_folders") or []
    if links:
        more = f" and {len(links) - 3} more" if len(links) > 3 else ""
        warn(
            f"{len(links)} symlinked folder(s) not followed, their images are not in the dataset: "
            f"{', '.join(links[:3])}{more}; copy or bind-mount the folder into the dataset to include it"
        )


def _caption_rows(c: dict) -> list[tuple[str, int]]:
    if not c or not (c.get("user") or c.get("new") or c.get("changed") or c.get("removed")):
        return []
    return [
        ("images with captions written by hand", c["user"]),
        (
            "caption files new / changed / gone",
            f"{len(c['new'])} / {len(c['changed'])} / {len(c['removed'])}",
        ),
    ]


BAD_NAME_FIX = "file name is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8 -r --notest DIR)"


def _unusable(ds: Dataset, d: dict) -> list[list[str]]:
    """[path, reason, detail] of every file the scan rejected, names that are not UTF-8 first."""
    rows = [[n, "bad-filename", BAD_NAME_FIX] for n in d.get("bad_names", [])]
    rows += [
        [r[0], r[1], r[2] or ""]
        for r in ds.manifest.conn.execute(
            "SELECT r.path, r.reason, r.detail FROM rejects r JOIN files f ON f.path=r.path"
            " WHERE r.stage='scan' AND f.status='ok' ORDER BY r.path"
        )
    ]
    return rows


def _print_unusable(rows: list[list[str]], where: str, limit: int = 20) -> None:
    if not rows:
        return
    more = f" (first {limit}; `curate scan {where} --json` lists all)" if len(rows) > limit else ""
    console.print(table(f"unusable files: {len(rows)}{more}", ["file", "reason", "detail"], rows[:limit]))
    bad = sum(1 for r in rows if r[1] == "bad-filename")
    if bad:
        warn(f"{bad} file name(s) are not valid UTF-8 and were left out of the manifest; rename them")


@app.command()
@handle_errors
def scan(
    path: DatasetArg,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild",
            help="Set the current (or damaged) manifest aside as manifest.db.corrupt-<time> / "
            ".before-rebuild-<time> and build a fresh one from the files.",
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="local (process pool) or ray (Ray Data tasks; needs the ray extra: pip install curate\\[ray]).",
        ),
    ] = "local",
    address: AddressOpt = None,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Read every new or changed image once: metadata, quality scores, perceptual hashes."""
    with _open(path, manifest, config, rebuild=rebuild) as ds:
        d = _do_scan(ds, as_json, engine, address)
        d["summary"] = ds.summary()
        d["unusable"] = _unusable(ds, d)
    if as_json:
        print_json(d)
    else:
        _print_scan(d)
        _print_unusable(d["unusable"], str(path))
        if d["interrupted"]:
            console.print("[yellow]interrupted: rerun `curate scan` to continue[/]")


def _apply_and_print(ds: Dataset, as_json: bool) -> dict:
    res = ds.apply()
    if not as_json:
        side = f" with {len(res.sidecars)} caption / cache sidecar(s)" if res.sidecars else ""
        if res.jsonl_lines:
            side += f"{' and' if side else ' with'} {len(res.jsonl_lines)} metadata.jsonl caption line(s)"
        console.print(
            f"moved {len(res.moved)} file(s){side} to .curate/quarantine (batch {res.batch}); "
            "undo: curate restore"
        )
    _print_skipped(res.skipped)
    return res.as_dict()


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    """One stderr line per file an apply/restore left alone; the command then exits 1."""
    for p, why in skipped:
        warn(f"skipped {p}: {why}")


def _exit_if_skipped(*results: dict | None) -> None:
    if any(r and r.get("skipped") for r in results):
        raise typer.Exit(1)


@app.command("filter")
@handle_errors
def filter_cmd(
    path: DatasetArg,
    min_side: Annotated[
        int | None, typer.Option(help="Reject images whose short side is below this.")
    ] = None,
    max_aspect: Annotated[
        float | None, typer.Option(help="Reject long/short side ratios above this.")
    ] = None,
    min_sharpness: Annotated[
        float | None, typer.Option("--min-sharpness", help="Reject blurrier images (variance of Laplacian).")
    ] = None,
    min_brightness: Annotated[float | None, typer.Option(help="Reject darker images (mean 0..1).")] = None,
    max_brightness: Annotated[float | None, typer.Option(help="Reject brighter images (mean 0..1).")] = None,
    min_entropy: Annotated[float | None, typer.Option(help="Reject near-constant images (bits).")] = None,
    allow: Annotated[
        list[str] | None, typer.Option(help="Accept a flag otherwise rejected: animated, cmyk, 16bit, alpha.")
    ] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Move rejects into .curate/quarantine.")] = False,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Mark images that break quality thresholds as rejects, with a reason each (scores are not recomputed)."""
    with _open(path, manifest, config, create=False) as ds:
        flags = None
        if allow:
            from .config import KNOWN_FLAGS
            from .errors import CurateError

            allow = [f.strip() for a in allow for f in a.split(",") if f.strip()]
            unknown = [f for f in allow if f not in KNOWN_FLAGS]
            if unknown:
                raise CurateError(f"unknown --allow {unknown[0]!r}; choose from {', '.join(KNOWN_FLAGS)}")
            flags = tuple(f for f in ds.config.filter.reject_flags if f not in allow)
        res = ds.filter(
            min_side=min_side,
            max_aspect=max_aspect,
            min_sharpness=min_sharpness,
            min_brightness=min_brightness,
            max_brightness=max_brightness,
            min_entropy=min_entropy,
            reject_flags=flags,
        )
        out = {"filter": res.as_dict()}
        if not as_json:
            examples: dict[str, list[str]] = {}
            for p, found in ds.manifest.rejected_paths(raw=True).items():
                for _stage, reason, _ in (f for f in found if f[0] == "filter"):
                    for r in reason.split(","):
                        examples.setdefault(r, []).append(p)
            rows = [
                (r, n, ", ".join(examples.get(r, [])[:3]) + (", ..." if len(examples.get(r, [])) > 3 else ""))
                for r, n in sorted(res.by_reason.items(), key=lambda kv: -kv[1])
            ]
            console.print(
                table(
                    f"filter: {res.rejected} of {res.checked} images rejected",
                    ["reason", "images", "e.g."],
                    rows,
                )
            )
            if res.kept_by_hand:
                more = f" and {len(res.kept_by_hand) - 3} more" if len(res.kept_by_hand) > 3 else ""
                console.print(
                    f"{len(res.kept_by_hand)} of them kept by hand (`curate keep`), so exported anyway: "
                    f"{escape(', '.join(res.kept_by_hand[:3]))}{more}",
                    highlight=False,
                )
        if apply:
            out["apply"] = _apply_and_print(ds, as_json)
    if as_json:
        print_json(out)
    _exit_if_skipped(out.get("apply"))


@app.command()
@handle_errors
def dedupe(
    path: DatasetArg,
    method: Annotated[
        str | None,
        typer.Option(
            help="auto (default: pHash + multi-crop pHash + ORB candidates, verified by RANSAC and NCC), "
            "phash, dhash, hash (pHash+dHash), clip, or both (auto + CLIP candidates)."
        ),
    ] = None,
    phash_threshold: Annotated[int | None, typer.Option(help="Max pHash Hamming distance (0-64).")] = None,
    dhash_threshold: Annotated[int | None, typer.Option(help="Max dHash Hamming distance (0-64).")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="CLIP cosine similarity threshold (clip/both).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="CLIP model: open_clip name, hf-hub: id or local path.")
    ] = None,
    pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag or weights file.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: auto).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="CLIP batch size.")] = None,
    keep: Annotated[
        str | None,
        typer.Option(
            help="Keep-best: 'original' (default: the most original copy, by rules) or an order of "
            "pixels,sharpness,filesize,png."
        ),
    ] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Move duplicates into .curate/quarantine.")] = False,
    thorough: Annotated[
        bool, typer.Option("--thorough", help="auto/both: verify pairs with SIFT (slower) instead of ORB.")
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="local (process pool) or ray: features and pair verification as Ray tasks "
            "(needs the ray extra: pip install curate\\[ray]).",
        ),
    ] = "local",
    address: AddressOpt = None,
    num_gpus: Annotated[
        float,
        typer.Option(
            "--num-gpus", help="--engine ray, clip/both: one CLIP actor per GPU (0: one CPU actor)."
        ),
    ] = 0,
    clear_overrides: Annotated[
        bool,
        typer.Option(
            "--clear-overrides",
            help="Forget the keeper / split / merge choices (made in `curate review` or with --keeper, "
            "--same, --not-duplicate) before grouping (otherwise every run replays them).",
        ),
    ] = False,
    keeper: Annotated[
        list[str] | None,
        typer.Option(
            "--keeper",
            metavar="FILE",
            help="Make FILE the keeper of its duplicate group; recorded, so every later dedupe replays it "
            "(repeatable).",
        ),
    ] = None,
    same: Annotated[
        list[str] | None,
        typer.Option(
            "--same",
            metavar="FILE",
            help="These files are copies of one image: their groups merge (twice or more: "
            "--same a.png --same b.png); recorded like --keeper.",
        ),
    ] = None,
    not_duplicate: Annotated[
        list[str] | None,
        typer.Option(
            "--not-duplicate",
            metavar="FILE",
            help="No two of these files are duplicates: their group is split (twice or more: "
            "--not-duplicate a.png --not-duplicate b.png); recorded like --keeper.",
        ),
    ] = None,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Group exact and near duplicates and keep the best copy of each group (hand choices replayed)."""
    from .errors import CurateError

    for name, v in (("--phash-threshold", phash_threshold), ("--dhash-threshold", dhash_threshold)):
        if v is not None and not 0 <= v <= 64:
            raise CurateError(f"{name} must be between 0 and 64 (Hamming distance of a 64-bit hash), got {v}")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise CurateError(f"--threshold is a cosine similarity between -1 and 1, got {threshold}")
    clip = {
        k: v
        for k, v in dict(
            model=model, pretrained=pretrained, threshold=threshold, device=device, batch_size=batch_size
        ).items()
        if v is not None
    }
    methods = ("auto", "phash", "dhash", "hash", "clip", "both")
    if method is not None and method not in methods:
        raise CurateError(f"unknown --method {method!r}; choose {', '.join(methods)}")
    with _open(path, manifest, config, create=False) as ds:
        cleared = None
        if clear_overrides:
            from .stages.overrides import clear

            cleared = clear(ds.manifest)
        recorded = None
        if keeper or same or not_duplicate:
            from .stages.overrides import record_cli

            recorded = record_cli(
                ds.manifest, keepers=keeper or [], same=same or [], apart=not_duplicate or []
            )
        chosen = method or ds.config.dedupe.method
        uses_clip = chosen in ("clip", "both")
        label = "embed + verify" if chosen == "both" else "embed" if uses_clip else "dedupe"
        with progress_bar(label, enabled=chosen in ("auto", "clip", "both") and not as_json) as bar:
            res = ds.dedupe(
                method=method,
                phash_threshold=phash_threshold,
                dhash_threshold=dhash_threshold,
                keep=tuple(keep.split(",")) if keep else None,
                clip=clip,
                progress=bar,
                engine=engine,
                address=address,
                num_gpus=num_gpus,
                **({"thorough": True} if thorough else {}),
            )
        out = {"dedupe": res.as_dict()}
        decided = ds.manifest.decisions()
        dropped = {p for g in res.groups for p in g.members[1:]}
        keepers = {g.keeper for g in res.groups}
        by_hand = {  # what `curate keep` / `curate reject` change in these groups (export follows them)
            "kept": sorted(p for p in dropped if decided.get(p, ("",))[0] == "keep"),
            "rejected": sorted(p for p in keepers if decided.get(p, ("",))[0] == "reject"),
        }
        if by_hand["kept"] or by_hand["rejected"]:
            out["dedupe"]["by_hand"] = by_hand
        if cleared is not None:
            out["dedupe"]["overrides_cleared"] = cleared
        if recorded is not None:
            out["dedupe"]["overrides_recorded"] = recorded
        if res.stats.get("notice"):
            from .ui import err_console

            err_console.print(f"notice: {escape(res.stats['notice'])}")
        if not as_json:
            rows = [
                (g.id, g.method, g.keeper, len(g.members) - 1, "; ".join(g.members[1:])) for g in res.groups
            ]
            console.print(
                table(
                    f"dedupe: {len(res.groups)} groups, {res.rejected} files marked duplicate",
                    ["group", "method", "kept", "dropped", "duplicates"],
                    rows,
                )
            )
            notes = [f"{p} kept by hand" for p in by_hand["kept"]]
            notes += [f"{p} rejected by hand" for p in by_hand["rejected"]]
            if notes:
                console.print(
                    f"decisions by hand win over the table: {escape('; '.join(notes))} "
                    "(`curate keep --undo` forgets one)",
                    highlight=False,
                )
            if cleared is not None:
                console.print(
                    f"forgot {cleared} hand choice(s) (curate review, --keeper, --same, --not-duplicate)"
                )
            for r in recorded or []:
                console.print(f"recorded: {r['kind']} {escape(r['files'])}", highlight=False)
            if res.overrides:
                ov = res.overrides
                labels = {"review": "from curate review", "cli": "from the command line"}
                parts = [(sum(o["source"] == k for o in ov["applied"]), v) for k, v in labels.items()]
                parts = [p for p in parts if p[0]] or [(0, "")]
                where = f"{parts[0][0]} hand choice(s) {parts[0][1]}".rstrip()
                where += "".join(f" and {n} {label}" for n, label in parts[1:])
                gone = f", {ov['ignored']} ignored (their images are gone)" if ov["ignored"] else ""
                console.print(
                    f"{where} applied (keeper / split / merge){gone}; forget them with --clear-overrides"
                )
            if res.stats:
                st = res.stats
                console.print(
                    f"auto: {st.get('direct_phash', 0)} pHash pairs, {st.get('pairs_verified', 0)} candidate "
                    f"pairs verified, {st.get('pairs_accepted', 0)} accepted, in {st.get('seconds', 0)} s "
                    "(why each link was made: --json or `curate report`)"
                )
            if res.clip:
                c = res.clip
                recall = (
                    f", sampled recall vs exact {c['recall_vs_exact']:.3f}"
                    if c.get("recall_vs_exact")
                    else ""
                )
                console.print(
                    f"CLIP {escape(str(c['model']))} ({escape(str(c['pretrained']))}): {c['embedded']} images, {c['pairs']} pairs >= "
                    f"{c['threshold']}, index {c['index']} in {c['seconds']} s{recall}"
                )
        if apply:
            out["apply"] = _apply_and_print(ds, as_json)
    if as_json:
        print_json(out)
    _exit_if_skipped(out.get("apply"))


@app.command()
@handle_errors
def check(
    path: DatasetArg,
    rule: Annotated[list[str] | None, typer.Option(help="Only these rules (default: all).")] = None,
    no_scan: Annotated[
        bool, typer.Option("--no-scan", help="Use the manifest as is, do not rescan.")
    ] = False,
    git: Annotated[
        bool,
        typer.Option(
            "--git",
            help="Only files git tracks (staged included), not ignored or untracked ones: the hook's.",
        ),
    ] = False,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Exit 1 with a table of every violated rule (use as a pre-commit hook on a dataset repo)."""
    from .stages.check import RULES

    if rule:
        unknown = [r for r in rule if r not in RULES]
        if unknown:
            from .errors import CurateError

            raise CurateError(f"unknown rule(s) {', '.join(unknown)}; choose from {', '.join(RULES)}")
    with _open(path, manifest, config, create=not no_scan, write=not no_scan) as ds:
        if not no_scan:
            with progress_bar("scan", enabled=not as_json) as bar:
                ds.scan(progress=bar)
        violations = ds.check(rule, git=git)
    if as_json:
        print_json({"ok": not violations, "violations": [v.as_dict() for v in violations]})
    elif violations:
        console.print(
            table(
                f"check: {len(violations)} violation(s)",
                ["file", "rule", "detail / fix"],
                [(v.path, v.rule, v.detail) for v in violations],
            )
        )
    else:
        console.print("[green]check: all rules pass[/]")
    raise typer.Exit(1 if violations else 0)


@app.command()
@handle_errors
def report(
    path: DatasetArg,
    out: Annotated[
        str | None, typer.Option(help="HTML file (default: <dataset>/.curate/report.html).")
    ] = None,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Write an HTML page: kept gallery with captions, score histograms, duplicates and rejects in words."""
    with _open(path, manifest, config, create=False, write=False) as ds:
        p = ds.report(out)
    if as_json:
        print_json({"report": str(p)})
    else:
        console.print(f"report written to {escape(str(p))}")


@app.command()
@handle_errors
def apply(path: DatasetArg, manifest: ManifestOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False):
    """Move every rejected file into <dataset>/.curate/quarantine (undo with `curate restore`)."""
    with _open(path, manifest, config, create=False) as ds:
        out = _apply_and_print(ds, as_json)
    if as_json:
        print_json(out)
    _exit_if_skipped(out)


@app.command()
@handle_errors
def restore(
    path: DatasetArg,
    batch: Annotated[str | None, typer.Option(help="Restore only this apply batch (default: all).")] = None,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """Undo --apply: move quarantined files back where they were (never overwriting)."""
    from .stages.quarantine import INDEX_NAME, QUARANTINE

    # A lost manifest is no reason to keep files in the quarantine: its own index says where they belong.
    has_index = (Path(path) / ".curate" / QUARANTINE / INDEX_NAME).exists()
    with _open(path, manifest, config, create=has_index) as ds:
        res = ds.restore(batch=batch)
    if as_json:
        print_json(res.as_dict())
    else:
        side = f" and {len(res.sidecars)} sidecar(s)" if res.sidecars else ""
        if res.jsonl_lines:
            side += f" and {len(res.jsonl_lines)} metadata.jsonl caption line(s)"
        console.print(f"restored {len(res.moved)} file(s){side}")
    _print_skipped(res.skipped)
    _exit_if_skipped(res.as_dict())


@app.command()
@handle_errors
def status(
    path: DatasetArg, manifest: ManifestOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False
):
    """Counts from the manifest: files, distinct images, rejects, quarantined."""
    with _open(path, manifest, config, create=False, write=False) as ds:
        counts = ds.summary()
        present = {r[0] for r in ds.manifest.conn.execute("SELECT path FROM files WHERE status='ok'")}
        rejects = {p: f for p, f in ds.manifest.rejected_paths().items() if p in present}
    if as_json:
        rows = [
            {"path": p, "stage": stage, "reason": reason, "detail": detail}
            for p, found in sorted(rejects.items())
            for stage, reason, detail in found
        ]
        print_json({**counts, "rejected": rows})
    else:
        console.print(table("status", ["", "count"], list(counts.items())))
        by: dict[tuple[str, str], list[str]] = {}
        for p, found in sorted(rejects.items()):
            for stage, reason, _ in found:
                by.setdefault((stage, reason), []).append(p)
        if by:
            rows = [(st, why, len(ps), ", ".join(ps[:3]) + (", ..." if len(ps) > 3 else ""))
                    for (st, why), ps in sorted(by.items())]  # fmt: skip
            console.print(
                table("rejected files still in the dataset", ["stage", "reason", "files", "e.g."], rows)
            )


@app.command("run")
@handle_errors
def run_all(
    path: DatasetArg,
    out: Annotated[
        str | None,
        typer.Option(help="Export the curated set here (kohya layout + dataset TOML + train.toml)."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="Target model family: sd15 (512 px buckets) or sdxl (1024).")
    ] = DEFAULT_FAMILY,
    trigger: Annotated[str | None, typer.Option(help="Trigger word put first in every caption.")] = None,
    class_word: Annotated[
        str | None, typer.Option("--class", help="Class word for the kohya folder name.")
    ] = None,
    val: Annotated[float, typer.Option(help="Validation fraction.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    reg: Annotated[
        str | None, typer.Option("--reg", help="Folder of regularization images to export with --out.")
    ] = None,
    manifest: ManifestOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
):
    """The whole curation in one go: scan, filter, dedupe, split, bucket, report; export + plan with --out."""
    from .pipeline import run_pipeline

    with _open(path, manifest, config) as ds:
        summary = run_pipeline(
            ds,
            out=out,
            model=model,
            trigger=trigger,
            class_word=class_word,
            val=val,
            seed=seed,
            reg=reg,
            show=not as_json,
        )
    if as_json:
        print_json(summary)


def _load_plugins() -> None:
    for name in PLUGINS:
        importlib.import_module(name).register(app)


_load_plugins()


def main() -> None:
    """Console entry point (``curate``); ``curate.__main__.main`` arms the signal handling first."""
    from .faults import install_signal_handlers, quiet_interrupt

    install_signal_handlers()
    try:
        app()
    except KeyboardInterrupt as exc:  # outside any command (argument parsing)
        quiet_interrupt(exc)


if __name__ == "__main__":
    main()
