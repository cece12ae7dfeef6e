"""One fresh process of the AOT-blocks test (``python -m tests.aot_child FOLDER OTHER_SIZE EAGER NAME [FP8]``):
build with compile_aot, run two images (and one of another size)."""
import json
import sys

import numpy as np

from tests.conftest import make_request_images
from tryon_lab import aot_blocks, checkpoint, configure, pipeline


def request(w: int, h: int) -> pipeline.TryOnRequest:
    return pipeline.TryOnRequest(*make_request_images(w, h), seed=0)


folder, other_size = sys.argv[1], sys.argv[2] == "1"
model_dir = checkpoint.random_checkpoint()
settings = pipeline.TryOnSettings(steps=2, progress=False)
opts = dict(device="cpu", dtype="float32", fp8=sys.argv[5] if len(sys.argv) > 5 else "fp8_weight_only")
pipe = configure.build_pipeline(model_dir, compile="regional", compile_aot=folder, **opts)
images = [np.asarray(pipeline.tryon(pipe, [request(128, 192)], settings).images[0]) for _ in range(2)]
from torch._dynamo.utils import counters  # noqa: E402

out = {"graphs": counters["stats"]["unique_graphs"], "build": pipe.build_report["aot_blocks"]}
if sys.argv[3] == "1":  # the same request without compile: how far the compiled code is from eager
    eager = configure.build_pipeline(model_dir, **opts)
    ref = np.asarray(pipeline.tryon(eager, [request(128, 192)], settings).images[0]).astype(float)
    out["max_abs_vs_eager"] = float(np.abs(images[1].astype(float) - ref).max())
if other_size:
    pipeline.tryon(pipe, [request(160, 192)], settings)
out["after"] = aot_blocks.report(pipe.aot_blocks)
out["same_twice"] = bool((images[0] == images[1]).all())
np.save(f"{folder}/image-{sys.argv[4]}.npy", images[1])
print("RESULT " + json.dumps(out, default=str))
