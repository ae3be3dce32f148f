"""The hooked forward and the patcher: bit-identity, pass-through, exact restore, no stacking."""
import types

import pytest
import torch

import ldm.modules.diffusionmodules.openaimodel as openaimodel
from lib_unetmods import Settings, StepClock, apply_mods, restore_model
from lib_unetmods.apply import ApplyContext
from lib_unetmods.forward import install_forward
from lib_unetmods.patcher import ACTIVE, MARKER, Patcher, restore_all
from lib_unetmods.unet_map import map_unet
from lib_unetmods.lab.model_state import assert_restored, snapshot

FREEU_ON = "freeu version=v1 b1=1.2 s1=0.8"


def test_hooked_forward_without_hooks_is_bit_identical(tiny_unet, make_inputs):
    inputs = make_inputs(tiny_unet, batch=3, height=24, width=40)
    expected = tiny_unet(**inputs)
    before = snapshot(tiny_unet)
    patcher = Patcher(tiny_unet)
    hooks = install_forward(tiny_unet, patcher, StepClock())
    assert "forward" not in tiny_unet.__dict__  # the UNet forward stays whoever's it is
    assert all("forward" in b.__dict__ for b in [*tiny_unet.input_blocks, tiny_unet.middle_block, *tiny_unet.output_blocks])
    assert torch.equal(tiny_unet(**inputs), expected)
    seen = []
    for point, fn in {"begin": lambda call: seen.append(point), "after_input": lambda i, h, call: h,
                      "after_skip": lambda i, h, call: h,
                      "to_skip": lambda i, h, size, call: h, "before_concat": lambda i, h, skip, call: (h, skip),
                      "after_output": lambda i, h, call: h, "end": lambda out, call: seen.append(out) or out}.items():
        hooks.add(point, fn, patcher)
    assert torch.equal(tiny_unet(**inputs), expected)  # pass-through hooks at every point: bit-identical
    assert len(seen) == 2 and seen[1] is not None
    patcher.restore()
    assert_restored(tiny_unet, before)


def test_hooks_do_not_keep_consumed_skips_alive(tiny_unet, make_inputs):
    """The host drops each skip when its output block takes it; the hook points must not hold it
    to the end of the call (that, with a needless second concat, put DeepCache's peak 24 % above the
    unpatched UNet's at 1024x1024)."""
    import weakref

    inputs = make_inputs(tiny_unet, batch=2, height=16, width=16)
    patcher = Patcher(tiny_unet)
    hooks = install_forward(tiny_unet, patcher, StepClock())
    refs: list[weakref.ref] = []
    alive_after_output: list[list[bool]] = []
    hooks.add("after_input", lambda i, h, call: refs.append(weakref.ref(h)) or h, patcher)
    hooks.add("after_output", lambda i, h, call: alive_after_output.append([r() is not None for r in refs]) or h, patcher)
    tiny_unet(**inputs)
    patcher.restore()
    n = len(tiny_unet.input_blocks)
    assert len(alive_after_output) == len(tiny_unet.output_blocks) == n
    for i, alive in enumerate(alive_after_output):  # after output block i, skips n-1-i .. n-1 are gone
        assert alive == [j < n - 1 - i for j in range(n)], (i, alive)


def test_replaced_parts_are_written_into_the_hosts_concat(tiny_unet, make_inputs):
    """A before_concat hook's new parts go into the host's fresh concat: the output block runs on
    the host's tensor, and nothing the hook made lives while it runs (a second concat, and the
    hook's tensors, had FreeU's peak 28 % above the unpatched UNet's at 1024x1024). The output is
    the one a new concat gives (here built by a plain pre-hook that replaces the block's input)."""
    import weakref

    inputs = make_inputs(tiny_unet, batch=2, height=16, width=16)
    i, c = 1, map_unet(tiny_unet).h_channels[1]
    block = tiny_unet.output_blocks[i]

    def change(h, skip):
        return h * 2, -skip

    def replace_input(module, args):
        h, skip = change(args[0][:, :c], args[0][:, c:])
        return (torch.cat([h, skip], dim=1), *args[1:])

    handle = block.register_forward_pre_hook(replace_input)
    expected = tiny_unet(**inputs)
    handle.remove()

    host_x, made, seen = [], [], []
    handles = [block.register_forward_pre_hook(lambda m, args: host_x.append(args[0])),
               block[0].register_forward_pre_hook(
                   lambda m, args: seen.append((args[0] is host_x[-1], [r() is not None for r in made])))]
    patcher = Patcher(tiny_unet)
    hooks = install_forward(tiny_unet, patcher, StepClock())

    def hook(j, h, skip, call):
        if j != i:
            return h, skip
        out = change(h, skip)
        made.extend(weakref.ref(t) for t in out)
        return out

    hooks.add("before_concat", hook, patcher)
    try:
        got = tiny_unet(**inputs)
    finally:
        patcher.restore()
        for handle in handles:
            handle.remove()
    assert torch.equal(got, expected)
    assert seen == [(True, [False, False])]


def test_everything_off_installs_nothing(tiny_unet, make_inputs):
    before = snapshot(tiny_unet)
    applied = apply_mods(tiny_unet, Settings(), StepClock())
    assert applied.patcher is None and applied.messages == []
    assert_restored(tiny_unet, before)
    assert MARKER not in tiny_unet.__dict__


def test_forward_uses_the_host_cat(make_unet, make_inputs, monkeypatch):
    """A1111 replaces openaimodel.th with its size-fixing cat: the hooked forward must use it."""
    unet = make_unet("sd15")
    calls = []

    class HostTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        def cat(self, tensors, dim=0):
            calls.append(dim)
            return torch.cat(tensors, dim=dim)

    monkeypatch.setattr(openaimodel, "th", HostTorch())
    applied = apply_mods(unet, Settings.from_text(FREEU_ON), StepClock())
    unet(**make_inputs(unet, batch=1, height=16, width=16))
    applied.restore()
    assert calls == [1] * len(unet.output_blocks)


def test_apply_twice_does_not_stack_and_leftover_is_removed(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=16, width=24)
    before = snapshot(unet)
    clock = StepClock()
    first = apply_mods(unet, Settings.from_text(FREEU_ON), clock)
    once = unet(**inputs)
    second = apply_mods(unet, Settings.from_text(FREEU_ON), clock)  # e.g. Forge's second hires call
    assert "leftover" in second.messages[0]
    assert not first.patcher.active
    assert torch.equal(unet(**inputs), once)
    assert len(second.patcher) == len(first.patcher) or len(second.patcher) > 0
    restore_model(unet)
    restore_model(unet)  # idempotent
    assert_restored(unet, before)
    assert id(unet) not in ACTIVE


def test_restore_all_and_model_identity(make_unet):
    a, b = make_unet("sd15"), make_unet("sdxl")
    snaps = snapshot(a), snapshot(b)
    apply_mods(a, Settings.from_text(FREEU_ON), StepClock())
    apply_mods(b, Settings.from_text(FREEU_ON), StepClock())
    assert id(a) in ACTIVE and id(b) in ACTIVE
    assert restore_all() == 2
    assert_restored(a, snaps[0])
    assert_restored(b, snaps[1])


def test_transaction_rolls_back_a_failing_technique(make_unet):
    unet = make_unet("sd15")
    before = snapshot(unet)
    patcher = Patcher(unet)
    with pytest.raises(RuntimeError):
        with patcher.transaction():
            install_forward(unet, patcher, StepClock())
            patcher.set_attr(unet.out[2], "padding", (2, 2))
            raise RuntimeError("boom")
    assert not patcher.active
    assert_restored(unet, before)


def test_a_foreign_forward_does_not_disable_the_hook_points(make_unet, make_inputs):
    """Another extension's forward on the instance (ControlNet's pattern: its own loop calling the
    blocks) or its leftover (the class forward bound to the UNet) leaves the block hooks working."""
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=16, width=16)
    plain = unet(**inputs)
    applied = apply_mods(unet, Settings.from_text(FREEU_ON), StepClock())
    expected = unet(**inputs)
    applied.restore()
    assert not torch.allclose(expected, plain, rtol=1e-3, atol=1e-4)

    class_forward = type(unet).forward
    for foreign in (types.MethodType(lambda self, *a, **k: class_forward(self, *a, **k), unet), unet.forward):
        unet.forward = foreign
        applied = apply_mods(unet, Settings.from_text(FREEU_ON), StepClock())
        assert applied.applied == ["freeu"] and applied.messages == []
        assert unet.__dict__["forward"] is foreign
        assert torch.equal(unet(**inputs), expected)
        applied.restore()
        assert torch.equal(unet(**inputs), plain)
        del unet.forward


def test_unsupported_model_is_skipped_with_a_message():
    applied = apply_mods(torch.nn.Linear(2, 2), Settings.from_text(FREEU_ON), StepClock())
    assert applied.patcher is None and "not a UNet" in applied.messages[0]


def test_map_families(make_unet):
    assert map_unet(make_unet("sd15")).family == "sd1"
    assert map_unet(make_unet("sd21")).family == "sd2"
    sdxl = map_unet(make_unet("sdxl"))
    assert sdxl.family == "sdxl"
    assert not any(a.level == 0 for a in sdxl.attention)
    assert [sdxl.skip_index(i) for i in range(9)] == list(range(8, -1, -1))


def test_apply_context_messages_name_the_technique(make_unet):
    unet = make_unet("sd15")
    ctx = ApplyContext(map_unet(unet), Patcher(unet), StepClock(), technique="freeu")
    ctx.warn("hello")
    assert ctx.messages == ["FreeU: hello"]


def test_forge_unet_class_gets_block_hooks_and_classic_forge_is_refused(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=16, width=16)
    applied = apply_mods(unet, Settings.from_text(FREEU_ON), StepClock())
    expected = unet(**inputs)
    applied.restore()
    original_class = type(unet)
    unet.__class__ = type("IntegratedUNet2DConditionModel", (original_class,), {"__module__": "backend.nn.unet"})
    applied = apply_mods(unet, Settings.from_text(FREEU_ON), StepClock())
    assert "forward" not in unet.__dict__ and applied.applied == ["freeu"]
    assert torch.allclose(unet(**inputs), expected, rtol=1e-5, atol=1e-6)
    applied.restore()
    unet.__class__ = type("UNetModel", (original_class,), {"__module__": "ldm_patched.ldm.modules.diffusionmodules.openaimodel"})
    applied = apply_mods(unet, Settings.from_text(FREEU_ON), StepClock())
    assert applied.patcher is None and "classic Forge" in applied.messages[0]


# --- mutations the other tests did not catch (issue 22) ------------------------------------------

def test_a_concat_the_host_does_not_own_is_never_written_into(tiny_unet, make_inputs):
    """A host whose output-block input is a view (here of a larger buffer) gets a new concat: the
    hook's parts are not written into memory the host may still use, and the output is right."""
    inputs = make_inputs(tiny_unet, batch=2, height=16, width=16)
    i = 1
    block = tiny_unet.output_blocks[i]
    c = map_unet(tiny_unet).h_channels[i]
    buffers = []

    def as_view(module, args):  # the host hands the block a view into a buffer it keeps
        x = args[0]
        buffer = torch.cat([x, x], dim=0)
        buffers.append((buffer, buffer.clone()))
        return (buffer[: x.shape[0]], *args[1:])

    def change(h, skip):
        return h * 2, -skip

    handle = block.register_forward_pre_hook(lambda m, args: (torch.cat(change(args[0][:, :c], args[0][:, c:]), dim=1), *args[1:]))
    expected = tiny_unet(**inputs)
    handle.remove()
    view_handle = block.register_forward_pre_hook(as_view)
    patcher = Patcher(tiny_unet)
    hooks = install_forward(tiny_unet, patcher, StepClock())
    hooks.add("before_concat", lambda j, h, skip, call: change(h, skip) if j == i else (h, skip), patcher)
    try:
        got = tiny_unet(**inputs)
    finally:
        patcher.restore()
        view_handle.remove()
    assert torch.equal(got, expected)
    buffer, before = buffers[0]
    assert torch.equal(buffer, before), "the hook wrote into the host's buffer"


def test_the_call_ends_when_the_forward_raises(tiny_unet, make_inputs):
    """The end hook runs with always_call: after an exception inside the UNet no call stays
    current, so a block called on its own afterwards runs as it is."""
    inputs = make_inputs(tiny_unet, batch=2, height=16, width=16)
    patcher = Patcher(tiny_unet)
    hooks = install_forward(tiny_unet, patcher, StepClock())

    def fail(i, h, call):
        if i == 2:
            raise RuntimeError("interrupted")
        return h

    hooks.add("after_input", fail, patcher)
    try:
        with pytest.raises(RuntimeError):
            tiny_unet(**inputs)
        assert hooks.current is None
    finally:
        patcher.restore()
