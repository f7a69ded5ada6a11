"""Command line: ``nvembed`` (click group) and ``nvembed-export``.

Each subcommand lives in its own module and is imported only when used (a lazy group), so a
missing optional package breaks only the command that needs it. Every command calls the public
Python API; an :class:`NVEmbedError` prints one line and exits 1.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from nvembed_sdk.errors import NVEmbedError, fmt, user_message

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
    "grow": "nvembed_sdk.train.cli:grow",
    "embed-corpus": "nvembed_sdk.cli_corpus:embed_corpus",
    "calibrate": "nvembed_sdk.cli_output:calibrate",
    "serve": "nvembed_sdk.cli_serve:serve",
}


DEBUG_ENV = "NVEMBED_DEBUG"


def debug_enabled() -> bool:
    """``nvembed --debug`` (this invocation) or NVEMBED_DEBUG=1: show tracebacks instead of one-line errors."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every error a user can cause (SDK, OS, Unicode) into one line on stderr and exit 1.

    ``nvembed --debug ...`` or NVEMBED_DEBUG=1 re-raises instead, with the traceback. Anything
    else (a bug) keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (NVEmbedError, OSError, UnicodeError) as exc:
            message = user_message(exc)
            if message is None or debug_enabled():
                raise
            # The message may quote a path or text holding lone surrogates: escape them, or
            # writing the error would itself fail.
            line = message.replace("\n", " ").encode("utf-8", "backslashreplace").decode("utf-8")
            click.echo(f"error: {line}", err=True)
            sys.exit(1)

    return wrapper


def usage_line(exc: click.UsageError) -> str:
    """A click usage error (bad option value, missing argument) in the house one-line form."""
    where = exc.ctx.command_path if exc.ctx is not None else "nvembed"
    return fmt(where, exc.format_message().rstrip("."), f"see `{where} --help` for the options and an example")


def standalone(main_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a click ``main`` with usage errors printed as one ``error:`` line and exit code 1."""
    try:
        return main_fn(*args, standalone_mode=False, **kwargs)
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # `nvembed` alone: the help
            click.echo(exc.ctx.get_help())
            sys.exit(2)
        click.echo(f"error: {usage_line(exc)}", err=True)
        sys.exit(1)
    except click.Abort:
        click.echo("error: interrupted | got Ctrl-C. Note: nothing was finished; run the command again", err=True)
        sys.exit(1)


class LazyGroup(click.Group):
    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        code = standalone(super().main, *args, **kwargs)
        sys.exit(code if isinstance(code, int) else 0)

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
@click.option("--debug", is_flag=True, help=f"Show tracebacks instead of one-line errors (also {DEBUG_ENV}=1).")
def main(debug: bool) -> None:
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


def describe(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """Facts about a checkpoint (even config-only) or a bundle, for ``nvembed info``.

    A bundle's files are checked against its manifest as :meth:`Embedder.load` does (sizes,
    sha256 under 2 GB); ``verify`` hashes every file.
    """
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
        info["checksums"] = _check_files(p, m, verify)
        model = m.get("model", {})
        info.update(_graph_facts(p, m))
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


def _graph_facts(p: Path, m: dict[str, Any]) -> dict[str, Any]:
    """Which graph an ONNX bundle holds and its share of MACs / activation bytes per dtype."""
    graph = m.get("graph") or (m.get("source") or {}).get("graph")
    if not graph and m.get("kind") == "onnx":
        try:  # bundles from before the audit was recorded: measure now (one ONNX Runtime run)
            from nvembed_sdk.exporters.audit import audit_graph

            graph = audit_graph(p)
        except ImportError:
            return {}
    if not graph:
        return {}
    from nvembed_sdk.exporters.audit import format_shares

    out = {}
    if graph.get("runtime"):
        out["graph"] = f"for {graph['runtime']} ({graph.get('base_dtype')} base)"
    out[f"MACs by dtype ({graph['probe']})"] = format_shares(graph["macs"])
    out["activation bytes by dtype"] = format_shares(graph["activation_bytes"])
    if graph.get("attention_bmm_macs"):
        out["attention BMM MACs by dtype"] = format_shares(graph["attention_bmm_macs"])
    attention = (m.get("quantization") or {}).get("attention")
    if attention:
        out["attention BMMs"] = f"{attention['bmm_dtype']} ({attention['reason']})"
    return out
def _check_files(p: Path, m: dict[str, Any], verify: bool) -> str:
    from nvembed_sdk.bundle_files import ALWAYS_HASH_BELOW, model_file, verify_files

    model_file(p, m)
    verify_files(p, m, full=verify)
    records = m.get("checksums")
    if not records:
        return f"none (format_version {m.get('format_version')}: files not verified; re-export to add them)"
    big = [n for n, r in records.items() if r["bytes"] >= ALWAYS_HASH_BELOW]
    if verify or not big:
        return f"OK: {len(records)} files, sizes and sha256 match"
    return f"OK: {len(records)} files, sizes match, sha256 of all but {', '.join(big)} (--verify hashes those)"


@click.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--verify", is_flag=True, help="Hash every bundle file, also those of 2 GB and more.")
@fail_cleanly
def info(path: str, as_json: bool, verify: bool) -> None:
    """Describe a checkpoint or bundle: architecture, parameters, dtype, tokenizer, max length.

    Works on a directory holding only config.json (no weights needed).

    \b
    Examples:
      nvembed info models/nvembed-debian-small
      nvembed info out/onnx --json
    """
    facts = describe(path, verify=verify)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if key == "parameters" and isinstance(value, int):
            value = f"{value:,} ({_human(value)})"
        click.echo(f"{key + ':':<26}{value}")


@click.command()
@click.argument("path", type=click.Path())
@click.option("--text", "texts", multiple=True, help="Passage text to embed (repeatable); --instruction applies to it.")
@click.option("--file", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="Passages: one per line (.txt) or JSONL with 'text' (.jsonl[.gz]), UTF-8.")
@click.option("--query", "queries", multiple=True,
              help="Query text to embed (repeatable), prefixed with 'Instruct: {task}\\nQuery: '.")
@click.option("--task", default=None,
              help="Task of the query prefix. Default: the NV-Embed-v2 README's question task. "
                   "Without --query, embeds the --text/--file texts as queries of this task.")
@click.option("--instruction", default="", help='Full prefix, e.g. "Instruct: <task>\\nQuery: " (use $\'...\' for \\n). '
              "Not with --query or --task.")
@click.option("--backend", default=None, type=click.Choice(["torch", "onnxruntime", "tensorrt"]), help="Default: from the artifact.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N. Default: CUDA if available.")
@click.option("--precision", default=None, help="torch backend only: fp32, bf16, fp16, autocast.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=None, type=click.IntRange(min=1), help="Truncation length in tokens. Default: the artifact's.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of vectors.")
@fail_cleanly
def embed(path: str, texts: tuple[str, ...], text_file: str | None, queries: tuple[str, ...], task: str | None,
          instruction: str, backend: str | None, device: str | None, precision: str | None, batch_size: int,
          max_length: int | None, as_json: bool) -> None:
    """Embed texts with any artifact and print the vectors (passages first, then queries).

    \b
    Examples:
      nvembed embed models/nvembed-debian-small --text "a tool to resize images"
      nvembed embed out/onnx --query "how do I resize an image?" --text "imagemagick: image tools"
      nvembed embed out/onnx --file passages.txt --json > vectors.json
      nvembed embed out/onnx --task "Given a word, retrieve its definition" --text "ephemeral"
    """
    from nvembed_sdk.embedder import DEFAULT_TASK, Embedder, query_instruction
    from nvembed_sdk.errors import InputError
    from nvembed_sdk.textsets import read_texts

    if instruction and (queries or task):
        raise InputError("--instruction | got it with --query/--task. Note: --query and --task build the "
                         "query prefix themselves; pass either --instruction or --query/--task")
    items = list(texts)
    if text_file:
        items += read_texts(text_file)
    if not items and not queries:
        raise InputError("texts | got none. Note: pass --text TEXT or --query TEXT (repeatable) or --file FILE")
    prefix = query_instruction(task or DEFAULT_TASK)
    opts = {"precision": precision} if precision else {}
    emb = Embedder.load(path, backend=backend, device=device, **opts)
    passage_prefix = prefix if (task and not queries) else instruction
    parts = [emb.embed(items, instruction=passage_prefix, batch_size=batch_size, max_length=max_length)]
    if queries:
        parts.append(emb.embed(list(queries), instruction=prefix, batch_size=batch_size, max_length=max_length))
    vecs = np.concatenate(parts) if len(parts) > 1 else parts[0]
    labels = [f"{t[:50]!r}" for t in items] + [f"query {q[:44]!r}" for q in queries]
    if as_json:
        click.echo(json.dumps({"backend": emb.backend, "precision": emb.precision, "dim": emb.dim,
                               "embeddings": [[round(float(x), 7) for x in v] for v in vecs]}))
        return
    click.echo(f"# {emb!r}")
    for label, v in zip(labels, vecs, strict=True):
        head = " ".join(f"{x:+.4f}" for x in v[:6])
        click.echo(f"{label:<54} [{head} ...] dim={len(v)}")


def export_main() -> None:
    """Entry point of ``nvembed-export`` (same as ``nvembed export``)."""
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    cmd = LazyGroup.get_command(main, click.Context(main), "export")  # type: ignore[arg-type]
    assert cmd is not None
    code = standalone(cmd.main, prog_name="nvembed-export")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
