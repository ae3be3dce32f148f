"""Peak RSS (ru_maxrss) of one configuration in a fresh process: build the UNet, sample STEPS Euler
steps at SIZE px (SD1.5 architecture), print the peak. Usage: python dev/peak_rss.py UNET_SIZE PX STEPS [MODS]; the output goes to bench-out/."""
import json, os, resource, sys, time, torch
sys.path.insert(0, ".")
torch.set_num_threads(2)
from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.random_unets import build_unet, example_inputs, sdpa_attention
from lib_unetmods.sampler import euler_sample

unet_size, px, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mods = sys.argv[4] if len(sys.argv) > 4 else ""
torch.set_grad_enabled(False)
unet = build_unet("sd15", unet_size)
inp = example_inputs(unet, 2, px // 8, px // 8)
after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
clock = StepClock(); clock.start(steps)
applied = apply_mods(unet, Settings.from_text(mods, strict=True, family="sd1"), clock, latent_shape=(1, 4, px // 8, px // 8)) if mods else None
t0 = time.perf_counter()
with sdpa_attention():
    out = euler_sample(unet, inp["x"][:1], inp["context"][:1], inp["context"][1:], steps, clock)
if applied: applied.restore()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"unet": unet_size, "px": px, "steps": steps, "mods": mods or "none", "maxrss_mb": peak / 1024,
                  "after_build_mb": after_build / 1024, "s": time.perf_counter() - t0}), flush=True)
os.makedirs("bench-out", exist_ok=True)
torch.save(out, f"bench-out/out_{unet_size}_{px}_{steps}_{(mods or 'none').replace(' ', '_').replace(';', '')}.pt")
