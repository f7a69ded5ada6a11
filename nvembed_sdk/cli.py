"""Command line: ``nvembed`` (click group) and ``nvembed-export``.

Each subcommand lives in its own module and is imported only when used (a lazy group), so a
missing optional package breaks only the command that needs it. Every command calls the public
Python API; an :class:`NVEmbedError` prints one line and exits 1.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nvembed_sdk.errors import NVEmbedError

# command name -> "module:attribute"
COMMANDS: dict[str, str] = {
    "info": "nvembed_sdk.cli:info",
    "embed": "nvembed_sdk.cli:embed",
    "export": "nvembed_sdk.cli_export:export",
    "parity": "nvembed_sdk.cli_parity:parity",
    "bench": "nvembed_sdk.cli_parity:bench",
    "train": "nvembed_sdk.train.cli:train",
    "mine": "nvembed_sdk.train.cli:mine",
    "eval": "nvembed_sdk.train.cli:evaluate",
    "tokenizer": "nvembed_sdk.train.cli:tokenizer",
    "serve": "nvembed_sdk.cli_serve:serve",
}


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SDK errors into one line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NVEmbedError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            reason = str(exc)

            @click.command(name, help=f"(unavailable: {reason})", context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def missing(args: tuple[str, ...]) -> None:
                click.echo(f"error: nvembed {name} | unavailable ({reason})", err=True)
                sys.exit(1)

            return missing


@click.group(cls=LazyGroup)
@click.version_option(package_name="nvembed-sdk")
def main() -> None:
    """nvembed: NV-Embed models from training to deployment.

    \b
    Typical flow:
      nvembed info models/<name>
      nvembed-export --model models/<name> --to onnx --precision fp32 --output out/onnx
      nvembed parity models/<name> out/onnx
      nvembed embed out/onnx --text "hello"
    """


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def describe(path: str | Path) -> dict[str, Any]:
    """Facts about a checkpoint (even config-only) or a bundle, for ``nvembed info``."""
    from nvembed_sdk.config import NVEmbedConfig
    from nvembed_sdk.errors import ArtifactError, fmt
    from nvembed_sdk.manifest import MANIFEST, read_manifest

    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise ArtifactError(fmt("path", f"{path} does not exist", "a checkpoint or bundle directory"))
    info: dict[str, Any] = {"path": str(p)}
    if (p / MANIFEST).is_file():
        m = read_manifest(p)
        info.update(kind=m.get("kind"), precision=m.get("precision"), files=m.get("files"))
        model = m.get("model", {})
    else:
        model = {}
    if (p / "config.json").is_file():
        cfg = NVEmbedConfig.from_file(p)
        t, la = cfg.text, cfg.latent
        info.setdefault("kind", "checkpoint")
        info.update(
            architecture=f"NVEmbedModel: bidirectional Mistral ({t.num_hidden_layers} layers, hidden {t.hidden_size}, "
            f"{t.num_attention_heads} heads / {t.num_key_value_heads} KV heads, head dim {t.head_dim}, "
            f"MLP {t.intermediate_size}) + latent attention ({la.num_latents_value} latents, "
            f"{la.num_cross_heads} heads x {la.cross_dim_head})",
            parameters=cfg.num_parameters,
            dim=cfg.dim,
            dtype=cfg.torch_dtype,
            max_length=cfg.max_length,
            max_position_embeddings=t.max_position_embeddings,
        )
        weights = sorted(f.name for f in p.glob("*.safetensors"))
        info["weights"] = weights or "none (config only)"
    elif model:
        info.update(parameters=model.get("num_parameters"), dim=model.get("dim"),
                    max_length=m.get("text", {}).get("max_length"))
    else:
        raise ArtifactError(fmt(str(p), "no config.json or nvembed.json", "an NV-Embed checkpoint or bundle"))
    tok = p / "tokenizer.json"
    if tok.is_file():
        from nvembed_sdk.text import TextPipeline

        pipe = TextPipeline(p)
        info["tokenizer"] = f"tokenizer.json ({pipe.vocab_size} tokens, eos {pipe.eos_token!r}, pad id {pipe.pad_id})"
    else:
        info["tokenizer"] = "none"
    return info


@click.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@fail_cleanly
def info(path: str, as_json: bool) -> None:
    """Describe a checkpoint or bundle: architecture, parameters, dtype, tokenizer, max length.

    Works on a directory holding only config.json (no weights needed).
    """
    facts = describe(path)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if key == "parameters" and isinstance(value, int):
            value = f"{value:,} ({_human(value)})"
        click.echo(f"{key + ':':<26}{value}")


@click.command()
@click.argument("path", type=click.Path())
@click.option("--text", "texts", multiple=True, help="Text to embed (repeatable).")
@click.option("--file", "text_file", type=click.Path(exists=True, dir_okay=False), help="One text per line.")
@click.option("--instruction", default="", help='Full prefix, e.g. "Instruct: <task>\\nQuery: " (use $\'...\' for \\n).')
@click.option("--query", "task", default=None, help="Embed as queries for this task (builds the Instruct/Query prefix).")
@click.option("--backend", default=None, type=click.Choice(["torch", "onnxruntime", "tensorrt"]), help="Default: from the artifact.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N. Default: CUDA if available.")
@click.option("--precision", default=None, help="torch backend only: fp32, bf16, fp16, autocast.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--max-length", default=None, type=int, help="Truncation length in tokens. Default: the artifact's.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of vectors.")
@fail_cleanly
def embed(path: str, texts: tuple[str, ...], text_file: str | None, instruction: str, task: str | None,
          backend: str | None, device: str | None, precision: str | None, batch_size: int,
          max_length: int | None, as_json: bool) -> None:
    """Embed texts with any artifact and print the vectors."""
    from nvembed_sdk.embedder import Embedder, query_instruction
    from nvembed_sdk.errors import InputError

    items = list(texts)
    if text_file:
        items += [line for line in Path(text_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise InputError("texts | got none. Note: pass --text TEXT (repeatable) or --file FILE")
    opts = {"precision": precision} if precision else {}
    emb = Embedder.load(path, backend=backend, device=device, **opts)
    if task:
        instruction = query_instruction(task)
    vecs = emb.embed(items, instruction=instruction, batch_size=batch_size, max_length=max_length)
    if as_json:
        click.echo(json.dumps({"backend": emb.backend, "precision": emb.precision, "dim": emb.dim,
                               "embeddings": [[round(float(x), 7) for x in v] for v in vecs]}))
        return
    click.echo(f"# {emb!r}")
    for text, v in zip(items, vecs, strict=True):
        head = " ".join(f"{x:+.4f}" for x in v[:6])
        click.echo(f"{text[:50]!r:<54} [{head} ...] dim={len(v)}")


def export_main() -> None:
    """Entry point of ``nvembed-export`` (same as ``nvembed export``)."""
    cmd = LazyGroup.get_command(main, click.Context(main), "export")  # type: ignore[arg-type]
    assert cmd is not None
    cmd(prog_name="nvembed-export")


if __name__ == "__main__":
    main()
