"""Run by the WebUI at start-up (with the WebUI root on PYTHONPATH): install what is missing.

The extension needs nothing beyond what the WebUI ships (torch, numpy, safetensors); this only
checks, and installs through the WebUI's own helpers if a stripped-down install lacks one.
Outside the WebUI it does nothing.
"""
REQUIREMENTS = {"numpy": "numpy", "safetensors": "safetensors"}  # import name -> pip requirement

try:
    import launch
except ImportError:
    launch = None

if launch is None:
    print("sd-webui-unetmods install.py: not running inside the WebUI; nothing to do")
else:
    for module, requirement in REQUIREMENTS.items():
        if not launch.is_installed(module):
            launch.run_pip(f"install {requirement}", f"{requirement} for sd-webui-unetmods")
