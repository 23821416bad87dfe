"""nemotron3 vs llama.cpp on the same model, CPU: greedy agreement and speed in interleaved pairs.

    python bench/llamacpp.py [--model models/pico] [--threads 1 2] [--repeats 3] [--types f32 bf16 q8_0 q4_0]
                             [--sections agree,tg,pp,batch] [--cache ~/.cache/nemotron3/llamacpp]

llama.cpp is the one bundled in the `llama-cpp-python` 0.3.36 sdist (one-time `pip download --no-binary :all:`
into the cache directory; nothing else touches the network). Its `vendor/llama.cpp` is copied out without
`.git` (or ninja re-runs cmake forever), built CPU-only with cmake (`-DGGML_NATIVE=ON`, Release), and its
converter is patched, in the cache directory only, to map our tokenizer's pre-tokenizer hash to `gpt-2`
(byte-level BPE with the GPT-2 regex). Without cmake / a C++ compiler the bench prints why and exits 0.

The model is converted to GGUF f32 and bf16 and q8_0 (convert_hf_to_gguf.py) and q4_0 (llama-quantize from
f32). Sections:
  agree  greedy tokens of 5 prompts x 128 tokens: llama.cpp (a small C driver over libllama, argmax of the
         logits) vs ours (`LLM`, greedy), per GGUF type
  tg     batch-1 decode of 128 tokens (llama-bench tg128 vs our engine generating 128 tokens from a
         1-token prompt, the prefill's time removed)
  pp     prefill of 512 tokens (llama-bench pp512 vs our engine on a 512-token prompt, 1 output token)
  batch  16 sequences decoding together (llama-batched-bench -npp 128 -ntg 128 -npl 16, its S_TG vs our
         engine on 16 prompts of 128 tokens generating 128 each, the prefill's time removed)
Each timing is a pair (llama.cpp run, then ours), repeated; the medians and their ratio (llama.cpp
tokens/s / ours: > 1 = llama.cpp faster) are printed per thread count.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from hashlib import sha256
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VERSION = "0.3.36"
TARGETS = ["llama-bench", "llama-batched-bench", "llama-quantize", "llama"]
PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "In a small village by the sea,"]

# Greedy decoding through libllama: argv model, n_gen, threads; stdin: one prompt per line as token ids;
# stdout: the generated ids per prompt (a fresh context per prompt).
DRIVER = r"""
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) return 1;
    const int n_gen = atoi(argv[2]), nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    char line[65536];
    while (fgets(line, sizeof line, stdin)) {
        llama_token toks[4096];
        int n = 0;
        for (char *p = strtok(line, " \n"); p; p = strtok(NULL, " \n")) toks[n++] = atoi(p);
        struct llama_context_params cp = llama_context_default_params();
        cp.n_ctx = n + n_gen + 8; cp.n_batch = cp.n_ubatch = n + 8;
        cp.n_threads = cp.n_threads_batch = atoi(argv[3]);
        struct llama_context *ctx = llama_init_from_model(model, cp);
        struct llama_batch b = llama_batch_get_one(toks, n);
        for (int i = 0; i < n_gen; i++) {
            if (llama_decode(ctx, b)) return 2;
            const float *lg = llama_get_logits_ith(ctx, -1);
            llama_token best = 0;
            for (int v = 1; v < nv; v++) if (lg[v] > lg[best]) best = v;
            printf("%d ", best);
            toks[0] = best;
            b = llama_batch_get_one(toks, 1);
        }
        printf("\n");
        fflush(stdout);
        llama_free(ctx);
    }
    llama_model_free(model);
    return 0;
}
"""


def sh(cmd, **kw) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


# ------------------------------------------------------------------------------------------------ build
def build(cache: Path, tokenizer_dir: Path) -> Path | None:
    """The llama.cpp tree + binaries under `cache` (built once), or None with a message when tools are missing."""
    missing = [t for t in ("cmake", "c++", "cc") if not shutil.which(t)]
    if missing:
        print(f"llama.cpp bench skipped: {', '.join(missing)} not found")
        return None
    src, bld = cache / "src", cache / "build"
    if not (src / "CMakeLists.txt").exists():
        sdist = next(iter((cache / "sdist").glob(f"llama_cpp_python-{VERSION}.tar.gz")), None)
        if sdist is None:
            sh([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                f"llama-cpp-python=={VERSION}", "-d", cache / "sdist"])
            sdist = next((cache / "sdist").glob(f"llama_cpp_python-{VERSION}.tar.gz"))
        with tarfile.open(sdist) as tf:
            tf.extractall(cache / "sdist", filter="data")
        shutil.copytree(cache / "sdist" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp", src,
                        ignore=shutil.ignore_patterns(".git"))
    patch_converter(src, tokenizer_dir)
    if not all((bld / "bin" / t).exists() for t in TARGETS[:3]):
        sh(["cmake", "-S", src, "-B", bld, "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
            "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF",
            "-DGGML_VULKAN=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_OPENSSL=OFF"])
        sh(["cmake", "--build", bld, "-j", str(os.cpu_count() or 2), "--target", *TARGETS])
    driver = bld / "bin" / "n3-greedy"
    if not driver.exists():
        (cache / "n3_greedy.c").write_text(DRIVER)
        sh(["cc", "-O2", cache / "n3_greedy.c", "-I", src / "include", "-I", src / "ggml" / "include",
            "-L", bld / "bin", "-lllama", f"-Wl,-rpath,{bld / 'bin'}", "-o", driver])
    return cache


def patch_converter(src: Path, tokenizer_dir: Path) -> None:
    """Register the model tokenizer's pre-tokenizer hash as gpt-2 in the copied converter (idempotent)."""
    from transformers import AutoTokenizer
    base = src / "conversion" / "base.py"
    text = base.read_text()
    chktxt = ast.literal_eval(re.search(r"chktxt = (.*)\n", text).group(1))
    h = sha256(str(AutoTokenizer.from_pretrained(tokenizer_dir).encode(chktxt)).encode()).hexdigest()
    if h in text:
        return
    mark = "        res = None\n"
    assert mark in text, "converter layout changed: cannot register the tokenizer hash"
    base.write_text(text.replace(mark, f'        res = "gpt-2" if chkhsh == "{h}" else None  # nemotron3 bench\n', 1))


def convert(cache: Path, model: Path, kind: str) -> Path:
    out = cache / "gguf" / f"{model.name}-{kind}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "q4_0":
        sh([cache / "build" / "bin" / "llama-quantize", convert(cache, model, "f32"), out, "q4_0"])
    else:
        sh([sys.executable, cache / "src" / "convert_hf_to_gguf.py", model, "--outtype", kind, "--outfile", out])
    return out


# ------------------------------------------------------------------------------------------------ ours
def our_llm(model: Path, threads: int, **kw):
    import torch
    from nemotron3.engine import LLM
    torch.set_num_threads(threads)
    return LLM(str(model), threads=threads, enable_prefix_caching=False, **kw)


def our_greedy(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    from nemotron3.engine import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]


def our_time(llm, prompts: list[list[int]], n: int) -> float:
    """Seconds to generate n tokens for each prompt (all in one batch), minus the same with 1 token."""
    from nemotron3.engine import SamplingParams
    def run(k):
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))
        return time.perf_counter() - t0
    return run(n) - run(1) if n > 1 else run(1)


# ------------------------------------------------------------------------------------------------ llama.cpp
def llama_bench(cache: Path, gguf: Path, threads: int, test: str) -> float:
    """tokens/s of llama-bench's pp512 or tg128."""
    arg = ["-p", "512", "-n", "0"] if test == "pp" else ["-p", "0", "-n", "128"]
    out = sh([cache / "build" / "bin" / "llama-bench", "-m", gguf, "-t", threads, "-r", "1", "-o", "json", *arg])
    return float(json.loads(out)[0]["avg_ts"])


def llama_batched(cache: Path, gguf: Path, threads: int, npl: int = 16) -> float:
    """S_TG (decode tokens/s over all sequences) of llama-batched-bench with npl sequences of 128 + 128."""
    out = sh([cache / "build" / "bin" / "llama-batched-bench", "-m", gguf, "-t", threads, "-tb", threads,
              "-c", str(npl * 260), "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", "128", "-npl", str(npl),
              "--output-format", "jsonl"])
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return float(rows[-1]["speed_tg"])


def llama_greedy(cache: Path, gguf: Path, prompts: list[list[int]], n: int, threads: int) -> list[list[int]]:
    out = sh([cache / "build" / "bin" / "n3-greedy", gguf, n, threads],
             input="".join(" ".join(map(str, p)) + "\n" for p in prompts))
    return [[int(t) for t in line.split()] for line in out.splitlines()]


# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "pico"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", nargs="+", default=["f32", "bf16", "q8_0", "q4_0"])
    ap.add_argument("--sections", default="agree,tg,pp,batch")
    ap.add_argument("--weight-dtype", default=None, choices=["bfloat16"],
                    help="ours with LLM(weight_dtype=...) instead of the defaults")
    ap.add_argument("--cache", default=str(Path(os.environ.get("NEMOTRON3_CACHE") or Path.home() / ".cache" /
                                                "nemotron3") / "llamacpp"))
    a = ap.parse_args()
    model, cache = Path(a.model).resolve(), Path(a.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    if build(cache, model) is None:
        return
    sections = set(a.sections.split(","))
    ggufs = {t: convert(cache, model, t) for t in a.types}
    from nemotron3.tokenizer import encode_text, load_tokenizer
    tok = load_tokenizer(model)
    prompts = [encode_text(tok, p) for p in PROMPTS]
    print(f"model {model} ({', '.join(f'{t} {ggufs[t].stat().st_size / 2**20:.1f} MiB' for t in a.types)}); "
          f"llama.cpp {VERSION} sdist build in {cache}")
    if "agree" in sections:
        ours = our_greedy(our_llm(model, a.threads[0], max_num_seqs=1), prompts, 128)
        for t in a.types:
            theirs = llama_greedy(cache, ggufs[t], prompts, 128, a.threads[0])
            same = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(ours, theirs)]
            print(f"agree {t:5s}: {sum(s == 128 for s in same)}/5 prompts equal over 128 tokens "
                  f"(first difference at {same})")
    long_prompt = (encode_text(tok, " ".join(PROMPTS) * 40) * 4)[:512]
    batch_prompts = [(encode_text(tok, PROMPTS[i % 5] + " " + PROMPTS[(i + 1) % 5]) * 40)[:128] for i in range(16)]
    for th in a.threads:
        kw = {"weight_dtype": a.weight_dtype} if a.weight_dtype else {}
        llm1, llm16 = our_llm(model, th, max_num_seqs=1, **kw), our_llm(model, th, max_num_seqs=16, **kw)
        our_greedy(llm1, [long_prompt[:16]], 8)                              # warm-up (builds the kernel)
        for name, on in (("tg", "tg" in sections), ("pp", "pp" in sections), ("batch", "batch" in sections)):
            if not on:
                continue
            for t in a.types:
                lt, ot = [], []
                for _ in range(a.repeats):
                    if name == "tg":
                        lt.append(llama_bench(cache, ggufs[t], th, "tg"))
                        ot.append(128 / our_time(llm1, [long_prompt[:1]], 129))
                    elif name == "pp":
                        lt.append(llama_bench(cache, ggufs[t], th, "pp"))
                        ot.append(512 / our_time(llm1, [long_prompt], 1))
                    else:
                        lt.append(llama_batched(cache, ggufs[t], th))
                        ot.append(16 * 128 / our_time(llm16, batch_prompts, 129))
                l, o = statistics.median(lt), statistics.median(ot)
                label = {"tg": "tg128", "pp": "pp512", "batch": "16-seq decode"}[name]
                print(f"{label:14s} threads {th}  llama.cpp {t:5s} {l:9.1f} tok/s   nemotron3 {o:9.1f} tok/s   "
                      f"llama.cpp/ours {l / o:5.2f}x   (pairs: {', '.join(f'{x:.0f}/{y:.0f}' for x, y in zip(lt, ot))})",
                      flush=True)


if __name__ == "__main__":
    main()
