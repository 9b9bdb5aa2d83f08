"""The Python entry point: ``Dataset.open(path)`` and one method per stage, each a call on the manifest."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config import CONFIG_NAME, Config, override
from .errors import CurateError
from .manifest import ImageRecord, Manifest


class Dataset:
    """A folder of images plus its manifest and options."""

    def __init__(self, root: Path, manifest: Manifest, config: Config) -> None:
        self.root = root
        self.manifest = manifest
        self.config = config

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        manifest: str | Path | None = None,
        config: str | Path | None = None,
        create: bool = True,
        write: bool = True,
        rebuild: bool = False,
    ) -> Dataset:
        """Open ``root``. ``write=False`` opens for reading only: it never waits for another curate's writer
        lock. ``rebuild`` sets the current manifest aside and starts a fresh one (``curate scan --rebuild``)."""
        root = Path(root).expanduser()
        if not root.exists():
            raise CurateError(f"dataset folder {root} does not exist; check the path")
        if not root.is_dir():
            raise CurateError(f"{root} is a file; pass the folder that holds the images")
        if config is not None and not Path(config).exists():
            raise CurateError(f"config file {config} does not exist")
        cfg = Config.load(config if config is not None else root / CONFIG_NAME)
        m = Manifest(root, manifest, create=create, write=write, rebuild=rebuild)
        return cls(root.resolve(), m, cfg)

    def close(self) -> None:
        self.manifest.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writable_root(self, what: str) -> None:
        import os

        if not os.access(self.root, os.W_OK):
            raise CurateError(f"dataset folder {self.root} is read-only; {what}", exit_code=1)

    # -- stages ------------------------------------------------------------------------------------
    def scan(self, *, progress=None, engine: str = "local", address: str | None = None, **options: Any):
        """Read new/changed images; record metadata, quality scores and perceptual hashes.

        ``engine`` is local (process pool) or ray (Ray Data tasks; ``address`` joins a cluster).
        """
        from .stages.scan import scan

        mapper = None
        if engine == "ray":
            from .engine.ray_engine import scan_mapper

            mapper = scan_mapper(address)
        elif engine != "local":
            raise CurateError(f"unknown engine {engine!r}; choose local or ray")
        return scan(self.manifest, override(self.config.scan, **options), progress=progress, mapper=mapper)

    def filter(self, **options: Any):
        """Mark images that break quality thresholds as rejects (stored scores only, no decoding)."""
        from .stages.filter import filter_images

        return filter_images(self.manifest, override(self.config.filter, **options))

    def dedupe(
        self,
        *,
        clip: dict[str, Any] | None = None,
        progress=None,
        engine: str = "local",
        address: str | None = None,
        num_gpus: float = 0,
        **options: Any,
    ):
        """Group exact and near duplicates and keep the best copy of each group.

        ``method`` is phash, dhash, hash (pHash and dHash agree), clip, or both (hash + CLIP).
        ``clip`` holds options for the CLIP finder (model, pretrained, threshold, device, batch_size).
        ``engine="ray"`` runs missing per-image features and candidate-pair verification as Ray tasks
        (``address`` joins a cluster), and CLIP embeddings (clip/both) on Ray actors that load the model
        once (``num_gpus``: one actor per GPU, 0: a CPU actor); candidate search and grouping stay here.
        """
        from .stages.dedupe import dedupe

        mapper = None
        cfg = override(self.config.dedupe, **options)
        if engine == "ray":
            from .engine import ray_engine

            if cfg.method in ("auto", "clip", "both"):  # the hash methods have nothing to hand out
                ray_engine.init(address)  # a wrong --address fails now, whatever the data
            mapper = ray_engine.task_mapper(address)
        elif engine != "local":
            raise CurateError(f"unknown engine {engine!r}; choose local or ray")
        extra = None
        if cfg.method in ("clip", "both"):
            from .stages.clip_dedupe import clip_pair_finder

            opts = {**self.config.section("clip"), **(clip or {})}
            if engine == "ray":
                from .engine.ray_engine import clip_encoder

                opts["encoder_for"] = lambda m, p: clip_encoder(m, p, address, num_gpus)
            extra = clip_pair_finder(self.manifest, progress=progress, **opts)
        elif cfg.method not in ("auto", "phash", "dhash", "hash"):
            raise CurateError(
                f"unknown dedupe method {cfg.method!r}; choose auto, phash, dhash, hash, clip or both"
            )
        return dedupe(self.manifest, cfg, extra_pairs=extra, progress=progress, mapper=mapper)

    def outliers(self, *, progress=None, **clip: Any):
        """Score kept images by CLIP similarity to their k nearest neighbours; flag the lowest for review."""
        from .stages.clip_dedupe import outliers

        opts = {**self.config.section("clip"), **{k: v for k, v in clip.items() if v is not None}}
        for key in ("threshold", "exact_max", "index"):  # dedupe-only options of the shared [clip] section
            opts.pop(key, None)
        return outliers(self.manifest, progress=progress, **opts)

    def check(self, rules: list[str] | None = None, *, git: bool = False):
        """Violated rules; ``git``: only files git tracks (what a commit holds, for the pre-commit hook)."""
        from .stages.check import check, git_tracked

        return check(self.manifest, self.config, rules, git_tracked(self.root) if git else None)

    def apply(self, *, dry_run: bool = False):
        """Move rejected files into ``.curate/quarantine`` (undo with :meth:`restore`)."""
        from .stages.quarantine import apply_rejects

        if not dry_run:
            self._require_writable_root("apply cannot move rejected files into .curate/quarantine")
        return apply_rejects(self.manifest, dry_run=dry_run)

    def restore(self, *, batch: str | None = None):
        from .stages.quarantine import restore

        self._require_writable_root("restore cannot move files back")
        return restore(self.manifest, batch=batch)

    def report(self, out: str | Path | None = None) -> Path:
        from .export.report import SECTIONS, build_report
        from .stages.bucket import report_section

        if report_section not in SECTIONS:
            SECTIONS.append(report_section)
        return build_report(self.manifest, Path(out) if out else None, self.config.filter)

    def split(self, val: float = 0.1, seed: int = 0, **options: Any):
        """Train/val split of the kept images, grouped so no near-duplicate crosses it (images.split)."""
        from .stages.split import split

        return split(self.manifest, val, seed, **options)

    def bucket(self, model: str | None = None, **settings: Any):
        """Assign kept images to the trainer's aspect buckets (images.bucket_w/h) and report the cost.

        ``model`` (sd15 | sdxl, default DEFAULT_FAMILY) sets the defaults of unset settings.
        """
        from .stages.bucket import bucket_images, family_settings

        return bucket_images(
            self.manifest, family_settings(model, **{k: v for k, v in settings.items() if v is not None})
        )

    def export(self, out: str | Path, format: str = "kohya", **options: Any):
        """Write kept images with captions for a trainer: kohya folders + TOML, or HF imagefolder."""
        if format == "kohya":
            from .export.kohya import export_kohya

            return export_kohya(self.manifest, Path(out), **options)
        if format == "diffusers":
            from .export.diffusers import export_diffusers

            options.pop("repeats", None)
            return export_diffusers(self.manifest, Path(out), **options)
        raise CurateError(f"unknown export format {format!r}; choose kohya or diffusers")

    def plan(self, **options: Any):
        """Training plan (LRs, epochs, repeats, batch, steps) with a reason per value; [plan] overrides tables."""
        from .stages.plan import plan
        from .stages.user_captions import refresh

        refresh(self.manifest)  # captions edited by hand since the scan count
        return plan(self.manifest, overrides=self.config.section("plan"), **options)

    def tag(
        self,
        *,
        model: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        force: bool | None = None,
        overwrite: bool = False,
        progress=None,
        backend: str | None = None,
        dtype: str | None = None,
        engine: str = "local",
        address: str | None = None,
        num_gpus: float = 0,
        decode: str | None = None,
        compile: bool | None = None,
        **caption: Any,
    ):
        """Tag kept images with a WD14 tagger (only those without stored scores), then rewrite captions.

        ``engine="ray"`` runs the tagger on Ray actors that load it once (``num_gpus``: one actor per GPU,
        0: a CPU actor); scores come back and are committed per batch here.

        ``caption`` holds caption options (general, character, mcut, trigger, drop_common, blacklist,
        replace, max_tags, format, ...); they are remembered, so a later call with only a new threshold
        re-thresholds stored scores in seconds without running the model.
        """
        from .stages.captions import Outcome, apply_changes, remembered
        from .stages.tag import tag_config, tag_images

        cfg = tag_config(
            self, model=model, device=device, backend=backend, dtype=dtype, batch_size=batch_size, force=force,
            decode=decode, compile=compile,
        )  # fmt: skip
        runner = None
        if engine == "ray":
            from .engine.ray_engine import tag_runner

            if cfg.decode == "gpu":  # the actors decode on their CPUs; say so before Ray starts
                raise CurateError(
                    "--decode gpu (nvJPEG) runs with --engine local; Ray actors decode on their CPUs: "
                    "drop --decode gpu or use --engine local"
                )
            runner = tag_runner(address, num_gpus=num_gpus)
        elif engine != "local":
            raise CurateError(f"unknown engine {engine!r}; choose local or ray")
        run = tag_images(self.manifest, cfg, progress=progress, runner=runner)
        if "source" not in caption:
            prev = remembered(self.manifest).get("source", self.config.section("caption").get("source"))
            caption["source"] = "both" if prev in ("caption", "both") else "tags"
        caption["tagger"] = run.model
        return Outcome(run, apply_changes(self.manifest, self.config, caption, overwrite=overwrite))

    def caption(
        self,
        *,
        combine: bool = False,
        overwrite: bool = False,
        progress=None,
        caption: dict[str, Any] | None = None,
        **options: Any,
    ):
        """Caption kept images with BLIP (batched; cached per model and options), then rewrite captions.

        ``combine`` merges the sentence with stored tags ("trigger, characters, sentence, tags").
        """
        from .config import _coerce
        from .stages.caption import BlipConfig, caption_images
        from .stages.captions import Outcome, apply_changes

        cfg = _coerce(BlipConfig, self.config.section("blip"), "blip")
        # the captioner and generation options of the last `curate caption` (as tag remembers its tagger),
        # so a later `--combine` reuses the stored sentences instead of loading the default model
        last = json.loads(self.manifest.get_meta("caption.options") or "{}")
        keys = ("num_beams", "min_length", "max_length", "repetition_penalty", "prompt", "max_side")
        remembered = {k: last.get(k) for k in keys}
        remembered["model"] = self.manifest.get_meta("caption.model")  # a local folder's absolute path
        cfg = override(override(cfg, **remembered), **options)
        run = caption_images(self.manifest, cfg, progress=progress)
        changes = {**(caption or {}), "source": "both" if combine else "caption"}
        return Outcome(run, apply_changes(self.manifest, self.config, changes, overwrite=overwrite))

    def edit(
        self,
        *,
        remove: list[str] | None = None,
        replace: list[str] | None = None,
        reset: bool = False,
        overwrite: bool = False,
        **caption: Any,
    ):
        """Change caption options (blacklist / replace add to earlier ones) and rewrite captions; no model runs."""
        from .stages.captions import SETTINGS_KEY, Outcome, apply_changes, current_config

        if reset:
            self.manifest.set_meta(SETTINGS_KEY, "{}")
        cur = current_config(self.manifest, self.config)
        if remove:
            caption["blacklist"] = tuple(dict.fromkeys([*cur.blacklist, *remove]))
        if replace:
            caption["replace"] = (*cur.replace, *replace)
        return Outcome(
            None, apply_changes(self.manifest, self.config, caption, overwrite=overwrite, edit_user=True)
        )

    def tag_stats(self):
        """Tag frequency table, always-present tags and per-image CLIP token counts."""
        from .stages.captions import tag_stats

        return tag_stats(self.manifest)

    # -- per-image decisions -----------------------------------------------------------------------
    def keep(self, paths: list[str | Path]) -> list[str]:
        """Keep these files whatever filter / dedupe decide (a scan error still wins); manifest paths."""
        from .stages.user_captions import resolve_image

        rels = list(dict.fromkeys(resolve_image(self.manifest, p) for p in paths))
        self.manifest.set_decisions(rels, "keep")
        return rels

    def reject(self, paths: list[str | Path], reason: str = "manual") -> list[str]:
        """Reject these files by hand (``curate apply`` quarantines them like any reject); manifest paths."""
        from .stages.user_captions import resolve_image

        reason = " ".join(str(reason).split()) or "manual"
        rels = list(dict.fromkeys(resolve_image(self.manifest, p) for p in paths))
        self.manifest.set_decisions(rels, "reject", reason)
        return rels

    def undecide(self, paths: list[str | Path]) -> list[str]:
        """Forget the manual decisions on these files (the stages' own decisions apply again)."""
        from .stages.user_captions import resolve_image

        rels = list(dict.fromkeys(resolve_image(self.manifest, p, allow_missing=True) for p in paths))
        self.manifest.set_decisions(rels, None)
        return rels

    def set_caption(self, path: str | Path, text: str) -> str:
        """Write ``text`` as the person's caption of one image (atomic; backup of other text of theirs).

        Returns the caption file (or ``metadata.jsonl::<image>``) written; it wins over curate's captions.
        """
        from .stages.user_captions import set_caption

        return set_caption(self.manifest, path, text)

    # -- reading -------------------------------------------------------------------------------------
    def images(self) -> list[ImageRecord]:
        return self.manifest.images()

    def kept(self) -> list[ImageRecord]:
        """Images that survive every decision so far (one path each)."""
        return self.manifest.kept_images()

    def summary(self) -> dict[str, Any]:
        return self.manifest.counts()

    def with_options(self, section: str, **options: Any) -> Dataset:
        cfg = dataclasses.replace(
            self.config, **{section: override(getattr(self.config, section), **options)}
        )
        return Dataset(self.root, self.manifest, cfg)
