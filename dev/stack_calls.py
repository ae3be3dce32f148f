"""Usage: python dev/stack_calls.py [PX]. Per-call times of the SD1.5-architecture UNet (full size, random weights) at 1024x1024, batch 2
(cond + uncond rows), SDPA, CPU: the call types a 20-step run of each configuration is made of."""
import json, sys, time, torch
sys.path.insert(0, ".")
torch.set_num_threads(2)
from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.random_unets import build_unet, example_inputs, sdpa_attention

size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
N = 20
unet = build_unet("sd15", "full")
inp = example_inputs(unet, 2, size // 8, size // 8)
results = []

def timed(label, text, steps_to_run, timed_steps):
    clock = StepClock(); clock.start(N)
    applied = apply_mods(unet, Settings.from_text(text, strict=True, family="sd1"), clock, latent_shape=tuple(inp["x"].shape)) if text else None
    try:
        for step in steps_to_run:
            clock.begin_step(step)
            t0 = time.perf_counter(); unet(**inp); dt = time.perf_counter() - t0
            if step in timed_steps:
                results.append({"call": f"{label}@{step}", "s": dt}); print(json.dumps(results[-1]), flush=True)
    finally:
        if applied: applied.restore()

with torch.no_grad(), sdpa_attention():
    timed("baseline", "", [0], [0])
    timed("stack", "stack=fast", [0, 1], [0, 1])          # full step with RAU-Net active, then a cheap step
    timed("hidiffusion", "hidiffusion", [10], [10])        # MSW-MSA only (past T1 = 8)
    timed("deepcache", "deepcache", [0, 1], [0, 1])         # full, cheap
    timed("hidiffusion", "hidiffusion", [0], [0])          # RAU-Net + MSW-MSA
    timed("baseline", "", [0], [0])
