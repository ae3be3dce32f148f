"""Stand-ins of the UNet hosts the extension runs on, written from their sources (read, not
copied): sd-webui-controlnet's replaced forward on A1111 (`controlnet`) and Forge's current UNet,
UnetPatcher and sampling batch layout (`forge`). Test-only: never shipped with the extension.
The benchmark imports them from a checkout (`python -m lib_unetmods.bench --host ...`)."""
