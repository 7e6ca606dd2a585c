"""The ``cubelm`` command line, generated from option dataclasses.

Each verb points (by import path) at an options dataclass and a run function in a light ``commands`` module of
its package; heavy imports (torch) happen inside the run functions, so ``cubelm --help`` stays fast. A dataclass
field ``max_new_tokens`` becomes ``--max-new-tokens``; its ``opt(help=...)`` metadata gives the help text, its
annotation the type. A ``CubelmError`` raised anywhere becomes a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import types
import typing
from dataclasses import dataclass

from cubelm.errors import CubelmError


def opt(default=dataclasses.MISSING, *, help: str, choices=None, metavar: str | None = None, flag: str | None = None):
    """A dataclass field that is also a CLI flag. ``flag`` overrides the generated ``--name``; a ``flag`` without
    a leading dash (``flag="SRC"``) makes a required positional argument shown as that name."""
    md = {"help": help, "choices": choices, "metavar": metavar, "flag": flag}
    if isinstance(default, list):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata=md)
    return dataclasses.field(default=default, metadata=md)


@dataclass(frozen=True, slots=True)
class Verb:
    name: str  # "plan", or "data prepare" for a verb in a group
    summary: str  # one line, shown by ``cubelm --help``
    target: str  # "package.module:OptionsClass:run_function"


VERBS: list[Verb] = [
    # in lifecycle order: data -> tokenizer -> model -> training -> evaluation -> inference -> systems
    Verb("data prepare", "Read, clean (with a report), tokenize and pack a corpus into train/val token shards.",
         "cubelm.data.commands:PrepareOptions:run_prepare"),
    Verb("data info", "Check a packed data directory and show its token counts and statistics.",
         "cubelm.data.commands:InfoOptions:run_info"),
    Verb("tokenizer train", "Train a byte-level BPE tokenizer (HF format, chat template) and print its stats.",
         "cubelm.data.commands:TokenizerTrainOptions:run_tokenizer_train"),
    Verb("model init", "Create a randomly initialized model directory from a preset (HF format).",
         "cubelm.model.commands:InitOptions:run_init"),
    Verb("model info", "Show a model directory's or preset's configuration and parameter count.",
         "cubelm.model.commands:InfoOptions:run_info"),
    Verb("train", "Train a model on packed data (AdamW, cosine schedule, checkpoints, exact --resume).",
         "cubelm.train.commands:TrainOptions:run_train"),
    Verb("finetune", "Fine-tune a model on instruct data: full, LoRA or QLoRA (adapters in peft's format).",
         "cubelm.finetune.commands:FinetuneOptions:run_finetune"),
    Verb("build-default", "Build the default model: stdlib corpus -> tokenizer -> tiny model -> model store.",
         "cubelm.train.commands:BuildDefaultOptions:run_build_default"),
    Verb("eval bpb", "Bits per byte on held-out text, next to gzip -9 and a unigram baseline.",
         "cubelm.eval.commands:BpbOptions:run_bpb"),
    Verb("eval retrieval",
         "Recall@k, MRR, nDCG of embedders x index types on a labeled stdlib set; build, size, latency.",
         "cubelm.eval.commands:RetrievalOptions:run_retrieval"),
    Verb("lora merge", "Fold a LoRA adapter (peft format) into its base model: a plain HF model directory.",
         "cubelm.finetune.lora_commands:MergeOptions:run_merge"),
    Verb("generate", "Generate text from a model directory (reference path: contiguous KV cache).",
         "cubelm.engine.commands:GenerateOptions:run_generate"),
    Verb("bench decode", "Decode speed of the engine (batch 1 or N) against the host's memory-bandwidth bound.",
         "cubelm.engine.bench:BenchDecodeOptions:run_bench_decode"),
    Verb("bench serve", "Load-test an OpenAI-compatible server (as vllm bench serve): TTFT/TPOT/ITL/E2EL, goodput.",
         "cubelm.eval.serve_bench_commands:BenchServeOptions:run_bench_serve"),
    Verb("pull", "Pull a model (s3://, gs://, http(s)://, file://) into the local store, verified by sha256.",
         "cubelm.store.commands:PullOptions:run_pull"),
    Verb("push", "Push a model directory with its sha256 manifest to s3://, gs:// or a directory.",
         "cubelm.store.commands:PushOptions:run_push"),
    Verb("models", "List the models in the local store: name, digest, size, path.",
         "cubelm.store.commands:ModelsOptions:run_models"),
    Verb("serve", "OpenAI-compatible HTTP server: streaming, API keys, rate limits, metrics, graceful drain.",
         "cubelm.serve.commands:ServeOptions:run_serve"),
    Verb("features demo", "Feature store (Feast, §6.1.6): build the Q&A repo, materialize, training join, lookup.",
         "cubelm.rag.feature_commands:DemoOptions:run_demo"),
    Verb("features materialize", "Copy new user features from the offline store (parquet) to the online (SQLite).",
         "cubelm.rag.feature_commands:MaterializeOptions:run_materialize"),
    Verb("features get", "Online features of users and the system preamble they give a chat request.",
         "cubelm.rag.feature_commands:GetOptions:run_get"),
    Verb("quantize", "Write an int8 / int4 weight-quantized copy of a model directory that LLM and serve load.",
         "cubelm.compress.quantized_io:QuantizeOptions:run_quantize"),
    Verb("compress prune", "Prune a model: magnitude or 2:4 zeros, or remove attention heads / MLP neurons.",
         "cubelm.compress.prune_commands:PruneOptions:run_prune"),
    Verb("compress distill", "Distil a teacher into a smaller student: α·T²·KL(teacher‖student) + (1−α)·CE.",
         "cubelm.compress.distill_commands:DistillOptions:run_distill"),
    Verb("compress lowrank", "Factorize the decoder's projections by truncated SVD (rank by energy, rank or size).",
         "cubelm.compress.lowrank:LowrankOptions:run_lowrank"),
    Verb("compress share", "Share weights across consecutive decoder layers (ALBERT-style) and/or tie embeddings.",
         "cubelm.compress.share:ShareOptions:run_share"),
    Verb("analyze", "Spectral analysis of each projection: ESD of WᵀW, power-law alpha (2-6 = well trained), PNG.",
         "cubelm.compress.spectral_commands:AnalyzeOptions:run_analyze"),
    Verb("compress smoothquant", "Calibrate, show the outlier channels, fold SmoothQuant's scales: a float HF model.",
         "cubelm.compress.w8a8_commands:SmoothQuantOptions:run_smoothquant"),
    Verb("compress w8a8", "Held-out bits per byte through W8A8 (plain, LLM.int8 outliers, SmoothQuant) vs fp32.",
         "cubelm.compress.w8a8_commands:W8A8Options:run_w8a8"),
    Verb("compress deep", "Deep Compression: prune -> k-means weight sharing -> Huffman; sizes per stage, quality.",
         "cubelm.compress.deep_commands:DeepOptions:run_deep"),
    Verb("compress report", "Every compression method on one model: bytes, held-out bits/byte, engine tok/s; PNG.",
         "cubelm.compress.report_commands:ReportOptions:run_report"),
    Verb("rag ingest", "Chunk a directory or the stdlib, embed the chunks and write a vector index (faiss or Chroma).",
         "cubelm.rag.commands:IngestOptions:run_ingest"),
    Verb("rag query", "Search a vector index with a text query: top-k chunks with scores and file:line citations.",
         "cubelm.rag.commands:QueryOptions:run_query"),
    Verb("rag chat", "Answer a question from a vector index with an LLM: grounded prompt, answer, cited sources.",
         "cubelm.rag.chat:ChatOptions:run_chat"),
    Verb("rag router", "Inference graph router: embed (encoder service) -> search --index -> LLM service, cited.",
         "cubelm.serve.router_commands:RouterOptions:run_router"),
    Verb("plan", "Memory plan for a model: weights, KV cache, activations, training states vs a budget.",
         "cubelm.systems.commands:PlanOptions:run_plan"),
    Verb("flops", "FLOPs of a matmul and of a model per token (prefill and decode).",
         "cubelm.systems.commands:FlopsOptions:run_flops"),
    Verb("pipeline simulate", "Simulate a pipeline schedule: device timelines, bubble fraction, in-flight activations.",
         "cubelm.systems.pipeline_commands:SimulateOptions:run_simulate"),
    Verb("autoscale simulate", "Simulate HPA / KEDA autoscaling on a traffic trace from a measured capacity curve.",
         "cubelm.systems.autoscale_commands:SimulateOptions:run_simulate"),
]


_GROUPS = {
    "data": "Corpus preparation: read, clean + dedup (report), tokenize, pack shards; inspect packed data.",
    "tokenizer": "Train a byte-level BPE tokenizer (HF format, chat template).",
    "model": "Create a random model from a preset, or show a model's config and size.",
    "eval": "Evaluate a model (bits per byte vs gzip and unigram baselines) or retrieval (labeled stdlib set).",
    "lora": "LoRA adapters: merge one into its base model (W + s·B·A), a plain HF model directory.",
    "compress": "Model compression: pruning, distillation, low rank, layer sharing, SmoothQuant / W8A8, Deep "
                "Compression.",
    "bench": "Benchmarks: engine decode speed; a load test of any OpenAI-compatible server (the side-by-side "
             "comparisons with other engines are in benchmarks/).",
    "rag": "Retrieval: ingest (chunk, embed, index) a directory or the stdlib, query an index, chat with cited "
           "sources, route an inference graph (encoder service -> index -> LLM service).",
    "pipeline": "Pipeline-parallel schedule simulator (bubbles, timelines).",
    "autoscale": "Autoscaling model (§6.2.2): replicas, SLO violations and cost of HPA / KEDA vs a fixed fleet.",
    "features": "Feature store for the Q&A service (Feast; the feature-store extra): point-in-time joins, online "
                "lookups that feed the chat prompt.",
}


def _resolve(target: str):
    module, cls, fn = target.split(":")
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, fn)


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_fields(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if "help" not in md:
            continue
        tp = _unwrap_optional(hints[f.name])
        flag = md.get("flag") or "--" + f.name.replace("_", "-")
        if not flag.startswith("-"):  # a positional argument: opt(help=..., flag="SRC")
            parser.add_argument(f.name, metavar=flag, type=tp, help=md["help"].replace("%", "%%"))
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw: dict = {"dest": f.name, "help": md["help"]}
        if tp is bool:
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(tp) is list:
            kw.update(action="append", type=typing.get_args(tp)[0], default=None, metavar=md.get("metavar"))
        else:
            kw.update(type=tp, default=default, choices=md.get("choices"), metavar=md.get("metavar"))
            if not has_default:
                kw["required"] = True
        if has_default and default not in (None, False, []) and tp is not bool:
            kw["help"] += f" (default: {default})"
        kw["help"] = kw["help"].replace("%", "%%")  # argparse %-formats help text: "70 % of" is not a format
        parser.add_argument(flag, **kw)


def _selected_verb(argv: list[str]) -> Verb | None:
    words = [a for a in argv if not a.startswith("-")][:2]
    for n in (2, 1):
        for verb in VERBS:
            if verb.name.split() == words[:n]:
                return verb
    return None


def build_parser(selected: Verb | None = None, *, all_verbs: bool = False) -> argparse.ArgumentParser:
    """Only the selected verb's module is imported (``all_verbs`` imports every one, for tests)."""
    parser = argparse.ArgumentParser(
        prog="cubelm", description="cubelm: a hackable, end-to-end LLM system. One verb per lifecycle step.")
    from cubelm import __version__
    parser.add_argument("--version", action="version", version=f"cubelm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    groups: dict[str, argparse._SubParsersAction] = {}
    for verb in VERBS:
        words = verb.name.split()
        target_sub = sub
        if len(words) == 2:
            if words[0] not in groups:
                gp = sub.add_parser(words[0], help=_GROUPS.get(words[0], f"{words[0]} commands"),
                                    description=_GROUPS.get(words[0]))
                groups[words[0]] = gp.add_subparsers(dest="subverb", metavar="VERB", required=True)
            target_sub = groups[words[0]]
        p = target_sub.add_parser(words[-1], help=verb.summary, description=verb.summary)
        if all_verbs or verb is selected:
            cls, _ = _resolve(verb.target)
            _add_fields(p, cls)
        p.set_defaults(_target=verb.target)
    return parser


def parse_options(argv: list[str]):
    """``(options, run)`` for a command line (``["serve", "--port", "80"]``), or None when it names no verb.
    A bad flag exits as argparse does; a bad value raises ``CubelmError`` (the options' validation)."""
    parser = build_parser(_selected_verb(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "_target", None):
        parser.print_help()
        return None
    cls, run = _resolve(args._target)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values = {k: v for k, v in values.items() if v is not None or k not in _defaults(cls)}
    return cls(**values), run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parsed = parse_options(argv)
        if parsed is None:
            return 2
        options, run = parsed
        return int(run(options) or 0)
    except CubelmError as e:
        print("cubelm: error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("cubelm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _defaults(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def entry() -> typing.NoReturn:
    """The console script and ``python -m cubelm``: ``main``, then the exit a torchrun rank needs (see
    ``cubelm.parallel.mesh.exit_rank``)."""
    code = main()
    dist = sys.modules.get("torch.distributed")  # imported only by the verbs that can join a group
    if dist is not None and dist.is_available() and dist.is_initialized():
        from cubelm.parallel.mesh import exit_rank
        exit_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
