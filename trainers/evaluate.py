"""``python -m trainers evaluate``: compare a base model with LoRAs on the same prompts and seeds.

Every model renders every prompt with every seed (each LoRA at every ``--strengths`` value; the
paper's 0.3, 0.4, 0.5 by default). Per model and strength: Face Confi. and Hand Confi. with
detection rates (``core.metrics``), the color shift from the base (HG-DPO Table 2: % change of
the HSV channel means), and optional scores from local weight folders (PickScore, HPS,
ImageReward, CLIP score). Between each pair of models, per metric: the win rate over prompts
(HG-DPO's protocol: a prompt's value is its mean over seeds and strengths; ties count half) with
the number of prompts and a 95% Wilson interval.

Output in ``--output``: ``report.html`` (self-contained but for the images beside it in
``images/``: per-prompt grids, the metric tables, a plot, the exact command) and ``report.json``.
Resumable: an image already rendered (by model, prompt, seed, strength) and its detections
(``detections.jsonl``) are reused, so an interrupted evaluation continues where it stopped.
Under torchrun / accelerate launch and with ``--shard I/N`` (then ``--merge``) the items are split
over processes and shards (``trainers/shards.py``, docs/scale-out.md); the merged output is the
one-process output.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from core.fileio import atomic_path, write_json_atomic

from . import base_files, shards

BASE = "base"
DETECTIONS = "detections.jsonl"  # face and hand scores of every image, one record per image path


@dataclass(frozen=True)
class Model:
    name: str
    lora: Path | None  # None: the base model


@dataclass(frozen=True)
class Render:
    model: str
    strength: float | None  # None for the base
    prompt: int
    seed: int

    @property
    def path(self) -> str:  # relative to the output folder
        level = "base" if self.strength is None else f"s{self.strength:g}"
        return f"images/{self.model}/{level}/p{self.prompt:03d}_seed{self.seed}.png"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="tiny-sd15",
                        help="a tiny base (tiny-sd15, tiny-sdxl, tiny-flux, tiny-zimage, tiny-sd3), an SD1.5/SDXL "
                             "single-file checkpoint, a Flux.1/SD3.5/Z-Image diffusion model file (with "
                             "--text-encoders, --vae) or a diffusers folder")
    parser.add_argument("--lora", action="append", required=True, metavar="FILE[:NAME]",
                        help="a LoRA to compare with the base (repeat for several); NAME labels it in the report")
    parser.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line")
    parser.add_argument("--seeds", type=_ints, default=[0, 1], help="comma-separated seeds (default 0,1)")
    parser.add_argument("--strengths", type=_floats, default=[0.3, 0.4, 0.5],
                        help="comma-separated LoRA strengths (default 0.3,0.4,0.5, as in the FairHuman paper)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--cfg", type=float, default=7.0,
                        help="classifier-free guidance scale (Flux.1-dev: unused; its distilled guidance is 3.5, "
                             "as trained; Z-Image-Turbo: 1, none)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--scorer", action="append", default=[], choices=("pickscore", "hps", "imagereward", "clipscore"),
                        help="also score with this model-based scorer (repeat); needs --scorer-model NAME=FOLDER")
    parser.add_argument("--scorer-model", action="append", default=[], metavar="NAME=FOLDER",
                        help="local weights folder of a scorer named by --scorer")
    parser.add_argument("--tiles", action="store_true", help="tiled detection (also counts small faces and hands)")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file checkpoints")
    base_files.add_arguments(parser)
    parser.add_argument("--output", type=Path, required=True, help="report folder")
    shards.add_arguments(parser)


def parse_models(specs: list[str]) -> list[Model]:
    models = []
    for spec in specs:
        path, sep, name = spec.rpartition(":") if ":" in Path(spec).name else (spec, "", "")
        path = Path(path if sep else spec)
        name = name or path.stem
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name == BASE:
            raise SystemExit(f"--lora {spec}: the name {name!r} must be letters, digits, '-', '_' or '.', not 'base'")
        models.append(Model(name, path))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise SystemExit(f"--lora: two LoRAs are named alike ({names}); label them as FILE:NAME")
    return models


def check_inputs(args, models: list[Model]) -> tuple[list[str], dict[str, str]]:
    """Everything that can be refused before a model loads: prompts, LoRA files and their
    architectures, strengths, seeds, scorer folders."""
    from core.lora_format import lora_architecture

    if not args.prompts.is_file():
        raise SystemExit(f"--prompts {args.prompts} is not a file")
    prompts = [p.strip() for p in args.prompts.read_text(encoding="utf-8").splitlines() if p.strip()]
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts} holds no prompt")
    if not args.seeds or not args.strengths or any(s <= 0 for s in args.strengths):
        raise SystemExit("--seeds and --strengths need at least one value each; strengths must be > 0")
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    for model in models:
        if not model.lora.is_file():
            raise SystemExit(f"--lora {model.lora}: no such file")
        try:
            lora_architecture(model.lora)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    folders = dict(value.partition("=")[::2] for value in args.scorer_model)
    for name in args.scorer:
        if not folders.get(name) or not Path(folders[name]).is_dir():
            raise SystemExit(f"--scorer {name} needs its weights folder: --scorer-model {name}=FOLDER "
                             "(see docs/scorers.md)")
    return prompts, folders


def renders(models: list[Model], prompts: list[str], seeds: list[int], strengths: list[float]) -> list[Render]:
    out = [Render(BASE, None, p, s) for p in range(len(prompts)) for s in seeds]
    out += [Render(m.name, st, p, s) for m in models for st in strengths for p in range(len(prompts)) for s in seeds]
    return out


def render_missing(args, models: list[Model], prompts: list[str], todo: list[Render], show: bool = True) -> None:
    """Generate the images not rendered yet, one model (and strength) at a time."""
    from tqdm import tqdm

    from core.lora_format import load_into_pipeline, lora_architecture, lora_fits
    from core.families import family_of

    pipe = base_files.load_pipeline_of(args).to(shards.Share.device())
    family = family_of(pipe, shards.Share.device())
    arch = family.name
    for model in models:
        trained_for = lora_architecture(model.lora)
        if not lora_fits(trained_for, arch):
            raise SystemExit(f"{model.lora.name} is a LoRA for {trained_for}, the base {args.base} is {arch}")
        load_into_pipeline(family, model.lora, model.name)
    common = dict(num_inference_steps=args.steps, cfg=args.cfg)
    if args.size:
        common.update(height=args.size, width=args.size)
    for item in tqdm(todo, desc="render", unit="img", disable=not show):
        if item.model == BASE:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters([item.model], adapter_weights=[item.strength])
        with torch.no_grad():
            image = family.render(prompts[item.prompt], torch.Generator().manual_seed(item.seed), **common)[0]
        with atomic_path(args.output / item.path) as tmp:
            image.save(tmp, format="PNG")


def detections(out: Path, items: list[Render], tiles: bool):
    """The record of each image's face and hand scores (``detections.jsonl``, by image path)."""
    from core.metrics import image_scores

    for item in items:
        scores = image_scores(out / item.path, item.path, tiles=tiles)
        yield {"image": item.path, "tiles": tiles, "faces": list(scores.face_scores), "hands": list(scores.hand_scores)}


def model_scores(out: Path, items: list[Render], prompts: list[str], names: list[str], folders: dict) -> dict:
    """{scorer: {image path: score}} for the model-based scorers asked for."""
    from PIL import Image

    from core.scorers import get_scorer

    found = {}
    for name in names:
        scorer = get_scorer(name, models=folders)
        found[name] = {}
        for item in items:
            with Image.open(out / item.path) as image:
                found[name][item.path] = float(scorer.score([image.convert("RGB")], [prompts[item.prompt]])[0])
    return found


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(out: Path, items: list[Render], prompts: list[str], found: dict, scores: dict) -> dict:
    """The report's numbers: per (model, strength) rows, and win rates between models."""
    from core.metrics import ImageScores, color_shift, hsv_means, summarize as confidences, win_rate

    def per_image(item):  # the metrics of one image, by name
        row = found[item.path]
        values = {"face_confidence": _mean(row["faces"]), "hand_confidence": _mean(row["hands"])}
        values.update({name: table[item.path] for name, table in scores.items()})
        return values

    groups: dict[tuple, list[Render]] = {}
    for item in items:
        groups.setdefault((item.model, item.strength), []).append(item)
        if item.model != BASE:
            groups.setdefault((item.model, "all"), []).append(item)
    base_hsv = hsv_means([out / i.path for i in groups[(BASE, None)]])
    rows = []
    for (model, strength), members in groups.items():
        report = confidences(ImageScores(i.path, tuple(found[i.path]["faces"]), tuple(found[i.path]["hands"]))
                             for i in members)
        hsv = hsv_means([out / i.path for i in members])
        row = {"model": model, "strength": strength, "images": len(members),
               "face_confidence": report.face_confidence, "face_detection_rate": report.face_detection_rate,
               "hand_confidence": report.hand_confidence, "hand_detection_rate": report.hand_detection_rate,
               "hsv_means": hsv, "color_shift": color_shift(base_hsv, hsv)}
        row.update({name: _mean(table[i.path] for i in members) for name, table in scores.items()})
        rows.append(row)

    metrics = ["face_confidence", "hand_confidence", *scores]
    by_prompt = {}  # model -> metric -> per-prompt mean over seeds and strengths
    for model in dict.fromkeys(i.model for i in items):
        members = [i for i in items if i.model == model]
        by_prompt[model] = {m: [_mean(per_image(i)[m] for i in members if i.prompt == p) for p in range(len(prompts))]
                            for m in metrics}
    names = list(by_prompt)
    wins = [{"a": a, "b": b, "metric": m, **win_rate(by_prompt[a][m], by_prompt[b][m]).to_json()}
            for m in metrics for i, a in enumerate(names) for b in names[i + 1:]]
    rows.sort(key=lambda r: (r["model"] != BASE, names.index(r["model"]) if r["model"] in names else 0,
                             r["strength"] == "all", r["strength"] if isinstance(r["strength"], float) else 0))
    return {"rows": rows, "win_rates": wins, "metrics": metrics, "per_prompt": by_prompt}


def run(args: argparse.Namespace) -> int:
    from .eval_report import write_html

    models = parse_models(args.lora)
    prompts, folders = check_inputs(args, models)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    items = renders(models, prompts, args.seeds, args.strengths)
    share = shards.Share.of(args.shard)
    store = shards.ShardedRecords(out / DETECTIONS, share, key=lambda r: r["image"],
                                  finished=lambda r: r.get("tiles") == args.tiles)
    try:
        found = store.load()
        if not args.merge:
            todo = [(k, i.path) for k, i in enumerate(items)
                    if not ((out / i.path).is_file() and store.finished(found.get(i.path, {})))]
            if share.reporter:
                print(f"evaluate: {len(models) + 1} models, {len(prompts)} prompts x {len(args.seeds)} seeds, "
                      f"strengths {args.strengths}: {len(items)} images, {len(items) - len(todo)} already done"
                      + (f" ({share.describe()} of the rest)" if share.count > 1 else ""), flush=True)

            def detected(positions):
                mine = [items[k] for k in positions]
                missing = [i for i in mine if not (out / i.path).is_file()]
                if missing:
                    render_missing(args, models, prompts, missing, show=share.reporter)
                return detections(out, mine, args.tiles)

            shards.work_share(store, todo, detected, "detect", "img")
            found = store.gathered()
            if found is None:
                return 0
        keys = [i.path for i in items]
        store.check_complete({k: r for k, r in found.items() if store.finished(r)}, keys)
        store.merge([found[k] for k in keys])
    except shards.ShardError as err:
        raise SystemExit(f"error: {err}") from None
    scores = model_scores(out, items, prompts, args.scorer, folders)
    summary = summarize(out, items, prompts, found, scores)
    command = getattr(args, "command_line", "python -m trainers evaluate (called from Python)")
    report = {"command": command, "base": args.base, "models": [{"name": m.name, "lora": str(m.lora)} for m in models],
              "prompts": prompts, "seeds": args.seeds, "strengths": args.strengths,
              "images": [{"model": i.model, "strength": i.strength, "prompt": i.prompt, "seed": i.seed,
                          "path": i.path} for i in items], **summary}
    write_json_atomic(out / "report.json", report)
    html = write_html(out / "report.html", report)
    print(f"wrote {html} and {out / 'report.json'}")
    return 0
