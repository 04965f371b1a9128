"""llama.cpp's divergence from our exact decoder, measured by the quality stage's own statistics, so that one table
holds our variants, the builder's int4 and llama.cpp (``gptoss quality`` measures the ONNX folders).

The evaluation text is tokenized with the exact folder's tokenizer and cut into the same chunks as ``gptoss
quality``; llama.cpp evaluates each chunk's token ids (no tokenization of its own) through the ``llama_cpp``
binding with ``logits_all=True``, in the binding's venv (``side_by_side.py --llama-binding`` builds it), one
process for every chunk, and writes the scored positions' logits; the exact decoder runs in ONNX Runtime here.
Rows: the text statistics of ``gptoss.proof.quality`` for the variant ``llama_cpp`` (no greedy rows: the side by
side compares llama.cpp's greedy tokens), with the GGUF's sha256 as the variant's data.

    .venv/bin/python benchmarks/llama_quality.py --exact W/ours_mxfp4/decoder --gguf W/llama_cpp/model.gguf \\
        --binding-python /tmp/peers/binding-venv/bin/python --csv llama_cpp.csv
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptoss.files import sha256  # noqa: E402
from gptoss.graphs.names import data_path  # noqa: E402
from gptoss.proof.quality import (  # noqa: E402
    TEXT_ID,
    evaluation_tokens,
    open_decoder,
    prefill_logits,
    score_text,
    text_statistics,
    write_rows,
)
from gptoss.runtimes.onnx_runtime import ort_session  # noqa: E402

# Run by the binding's python: every chunk's logits from its token ids, the scored positions only.
LLAMA_LOGITS = """
import json, sys
import numpy as np
from llama_cpp import Llama
spec = json.load(open(sys.argv[1]))
llm = Llama(model_path=spec["gguf"], n_ctx=spec["length"], n_batch=spec["length"], n_threads=spec["threads"],
            n_threads_batch=spec["threads"], logits_all=True, verbose=False)
for ids, out in zip(spec["chunks"], spec["files"]):
    llm.reset()
    llm.eval(ids)
    np.save(out, np.asarray(llm.scores[: len(ids)], dtype=np.float32)[spec["first"] :])
"""


def llama_logits(binding_python: Path, gguf: Path, chunks: list[list[int]], folder: Path, threads: int) -> list[Path]:
    """llama.cpp's logits of each chunk's scored positions, one ``.npy`` per chunk in ``folder``."""
    length = len(chunks[0])
    files = [folder / f"chunk{c}.npy" for c in range(len(chunks))]
    spec = {"gguf": str(gguf), "chunks": chunks, "files": [str(f) for f in files], "length": length,
            "first": length // 2, "threads": threads}  # fmt: skip
    (folder / "spec.json").write_text(json.dumps(spec))
    subprocess.run([str(binding_python), "-c", LLAMA_LOGITS, str(folder / "spec.json")], check=True)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exact", type=Path, required=True, help="our exact decoder folder")
    parser.add_argument("--gguf", type=Path, required=True, help="llama.cpp's GGUF of the same checkpoint")
    parser.add_argument("--binding-python", type=Path, required=True, help="python of a venv with llama_cpp")
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--text", type=Path, help="evaluation text (default: the packaged one)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--chunk-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    exact = open_decoder(args.exact, "--exact")
    tokens, text_path, _ = evaluation_tokens(exact, args.text, args.max_tokens)
    length = min(args.chunk_length, len(tokens) - 1)
    chunks = [tokens[c * length : (c + 1) * length].tolist() for c in range((len(tokens) - 1) // length)]
    with tempfile.TemporaryDirectory(dir=args.csv.parent) as tmp:
        files = llama_logits(args.binding_python, args.gguf.resolve(), chunks, Path(tmp), args.threads)
        first = length // 2

        def llama(ids: np.ndarray, chunk: int) -> np.ndarray:  # scored positions only: pad the unscored half
            scored = np.load(files[chunk])
            return np.concatenate([np.zeros((first, scored.shape[1]), np.float32), scored])

        session = ort_session(exact.onnx, args.threads)
        measures = score_text([prefill_logits(session, exact), llama], [exact.onnx, args.gguf], tokens, length)
    stats = text_statistics(measures)
    common = {
        "stage": "quality", "variant": "llama_cpp", "text_sha256": sha256(text_path), "tokens": len(tokens),
        "chunk_length": length, "exact_onnx_sha256": sha256(exact.onnx),
        "exact_data_sha256": sha256(data_path(exact.onnx)), "variant_onnx_sha256": "",
        "variant_data_sha256": sha256(args.gguf),
    }  # fmt: skip
    n = len(measures["kld"])
    rows = [common | dict(prompt_id=TEXT_ID, statistic=k, value=v, positions=n) for k, v in stats.items()]
    write_rows(rows, args.csv)
    print(f"llama_cpp: KLD mean {stats['kld_mean']:.4g}, p99 {stats['kld_p99']:.4g}, same top "
          f"{100 * stats['top1_agreement']:.1f}% over {n} positions -> {args.csv}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
