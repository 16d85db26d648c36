"""``python -m trainers build-pairs``: HG-DPO preference pairs from AI feedback.

For each prompt: N images from the target model (batched, seeds recorded), scored; the best and
the worst become a pair. Output: ``pairs.jsonl`` (one line per prompt: prompt, seeds, scores,
winner, loser, every image, status) and the images. Resumable per prompt; an image the scorer
fails on is recorded with the reason and left out of the choice, not fatal; a prompt whose images
all score the same is recorded as ``tied`` (there is no preference in it) and not trained on.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

from core.fileio import JsonlWriter, atomic_path, write_jsonl_atomic

from .methods.hg_dpo import PAIRS, read_pair_records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="tiny-sd15", help="tiny-sd15, tiny-sdxl, a single-file checkpoint or a diffusers folder")
    parser.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line")
    parser.add_argument("--n", type=int, default=20, help="images per prompt (paper: 20)")
    parser.add_argument("--scorer", default="anatomy", help="anatomy, pickscore, hps, imagereward, or a weighted composite such as anatomy:1,hps:5")
    parser.add_argument("--scorer-model", action="append", default=[], metavar="[NAME=]FOLDER",
                        help="local weights folder of a model-based scorer (pickscore, hps, imagereward); repeat as "
                             "NAME=FOLDER for each one in a composite")
    parser.add_argument("--output", type=Path, required=True, help="pairs folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; each image gets its own")
    parser.add_argument("--steps", type=int, default=30, help="sampler steps")
    parser.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--batch", type=int, default=4, help="images generated at once")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file checkpoints")


def scorer_folders(spec: str, values: list[str]) -> dict[str, str]:
    """``--scorer-model`` values as {scorer name: folder}; a bare folder belongs to the one
    scorer named by ``--scorer``."""
    folders = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            if "," in spec or ":" in spec:
                raise SystemExit(f"--scorer {spec} is a composite: give each folder as NAME=FOLDER")
            name, folder = spec, value
        folders[name.strip()] = folder
    return folders


FINISHED = ("ok", "tied")  # a prompt with status "error" is tried again on the next run


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.checkpoints import load_pipeline
    from core.scorers import get_scorer

    prompts = [p.strip() for p in args.prompts.read_text(encoding="utf-8").splitlines() if p.strip()]
    if not prompts:
        raise SystemExit(f"{args.prompts} has no prompts")
    if args.n < 2:
        raise SystemExit("--n must be at least 2: a pair needs a best and a worst image")
    scorer = get_scorer(args.scorer, models=scorer_folders(args.scorer, args.scorer_model))
    out = args.output
    (out / "images").mkdir(parents=True, exist_ok=True)
    jsonl = out / PAIRS
    records = read_pair_records(jsonl)
    todo = [(k, p) for k, p in enumerate(prompts) if records.get(p, {}).get("status") not in FINISHED]
    retried = sum(1 for _, p in todo if p in records)
    print(f"{len(prompts)} prompts, {len(prompts) - len(todo)} already done"
          + (f", {retried} failed before and tried again" if retried else ""))
    journal = JsonlWriter(jsonl)
    pipe = load_pipeline(args.base, tokenizer=args.tokenizer) if todo else None
    common = dict(num_inference_steps=args.steps, guidance_scale=args.cfg)
    if args.size:
        common.update(height=args.size, width=args.size)
    counts = {"ok": 0, "tied": 0, "error": 0}
    for k, prompt in tqdm(todo, desc="prompts", unit="prompt"):
        seeds = [args.seed + k * args.n + i for i in range(args.n)]
        record = {"prompt": prompt, "seeds": seeds, "images": [], "scores": [], "errors": {}}
        try:
            for start in range(0, args.n, args.batch):
                chunk = seeds[start: start + args.batch]
                images = pipe([prompt] * len(chunk), generator=[torch.Generator().manual_seed(s) for s in chunk],
                              **common).images
                for seed, image in zip(chunk, images):
                    name = f"images/{k:05d}_{seed}.png"
                    with atomic_path(out / name) as tmp:
                        image.save(tmp, format="PNG")
                    record["images"].append(name)
                    try:
                        record["scores"].append(float(scorer.score([image], [prompt])[0]))
                    except Exception as err:  # an unscorable image is recorded, not fatal
                        record["scores"].append(None)
                        record["errors"][name] = f"{type(err).__name__}: {err}"
            scored = [(s, name) for s, name in zip(record["scores"], record["images"]) if s is not None]
            if len(scored) < 2:
                raise ValueError(f"only {len(scored)} of {args.n} images could be scored")
            ranked = sorted(scored, key=lambda x: x[0])  # stable: ties keep generation order
            worst, best = ranked[0], ranked[-1]
            if best[0] == worst[0]:  # no preference to learn from; kept out of training
                record.update(status="tied", reason=f"all {len(scored)} scored images scored {best[0]}")
            else:
                record.update(status="ok", reason=None, winner=best[1], loser=worst[1], winner_score=best[0],
                              loser_score=worst[0])
        except Exception as err:
            record.update(status="error", reason=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-1500:])
        counts[record["status"]] += 1
        journal.append(record)  # a killed run keeps every finished prompt
        records[prompt] = record
    # one record per prompt, in prompt order (the journal may hold a retried prompt twice)
    write_jsonl_atomic(jsonl, [records[p] for p in dict.fromkeys(prompts) if p in records])
    failed = [p for p in dict.fromkeys(prompts) if records[p]["status"] == "error"]
    print(f"done: {counts['ok']} pairs, {counts['tied']} prompts whose images all scored the same, "
          f"{counts['error']} prompts failed, {len(prompts) - len(todo)} skipped as done")
    if failed:
        print(f"error: {len(failed)} of {len(prompts)} prompts failed (e.g. {failed[0]!r}: "
              f"{records[failed[0]]['reason']}); run the same command again to retry them", file=sys.stderr)
        return 1
    return 0
