"""Does ``torch.compile`` pay for the CPU classifier forward? Eager vs compiled, in one process, interleaved::

    python benchmarks/compile_forward.py [MODEL] [BATCH] [ROUNDS]        # defaults: tiny_cnn 16 5

The model (random weights, 2 classes, input 224, channels-last as the Predictor runs it) runs under
``torch.inference_mode`` with one torch thread on 64 random images per round; each round times the eager and the
compiled model (``torch.compile(dynamic=False)``) back to back in CPU time (``time.process_time``), so load from
other processes changes both alike and idle time counts for neither. Prints one JSON line: the compile's CPU
seconds, CPU ms per image of each round, the median speed-up, the images a Predictor must classify before the
compile has paid for itself, and the largest difference of the outputs.
"""

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch

    from breakhis_ray.models import create_model

    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "tiny_cnn"
    batch = int(args[1]) if len(args) > 1 else 16
    rounds = int(args[2]) if len(args) > 2 else 5
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(name, num_classes=2).eval().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def cpu_ms_per_image(f) -> float:
        start = time.process_time()
        for i in range(0, len(x), batch):
            f(x[i:i + batch])
        return (time.process_time() - start) / len(x) * 1000

    with torch.inference_mode():
        model(x[:batch])
        start = time.process_time()
        compiled = torch.compile(model, dynamic=False)
        compiled(x[:batch])
        compile_s = time.process_time() - start
        eager, comp = [], []
        for _ in range(rounds):
            eager.append(cpu_ms_per_image(model))
            comp.append(cpu_ms_per_image(compiled))
        diff = float((model(x[:batch]) - compiled(x[:batch])).abs().max())
    saved_ms = statistics.median(eager) - statistics.median(comp)
    print(json.dumps({
        "model": name, "batch": batch, "threads": 1, "compile_cpu_s": round(compile_s, 2),
        "eager_cpu_ms_per_image": [round(v, 2) for v in eager],
        "compiled_cpu_ms_per_image": [round(v, 2) for v in comp],
        "speedup_median": round(statistics.median(eager) / statistics.median(comp), 2),
        "break_even_images": round(compile_s * 1000 / saved_ms) if saved_ms > 0 else None,
        "max_abs_diff": diff,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
