"""The dynamic NF4 checkpoint in the training stack: QLoRA on SmolLM2-135M, on CPU.

Load dq's checkpoint with plain transformers, attach PEFT LoRA adapters, take a few optimizer steps on
held-out text (loss must fall), save the adapters, reload checkpoint + adapters and get the same logits;
and reloading the checkpoint alone reproduces the logits of its first load.
"""

from __future__ import annotations

import pytest

from tests._require import require

require("bitsandbytes")
require("peft")
torch = require("torch")

pytestmark = pytest.mark.slow

# Super-weight down_proj of SmolLM2 (massive activations at layers 11 and 28, see dq_plan.json of a
# measured run); given explicitly so the test skips the ~30 s calibration pass.
KEEP = {"model.layers.11.mlp.down_proj", "model.layers.28.mlp.down_proj"}


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_qlora_trains_saves_and_reloads(smollm2_dir, tmp_path):
    import bitsandbytes as bnb
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dq.data import heldout_text
    from dq.export.safetensors_bnb import quantize_safetensors_bnb

    torch.manual_seed(0)
    q = quantize_safetensors_bnb(smollm2_dir, tmp_path / "smollm2-dyn-nf4", keep=KEEP)
    assert {m.name for m in q.plan.kept} == KEEP | {"lm_head"}

    tok = AutoTokenizer.from_pretrained(q.path)
    ids = tok(heldout_text()[:20_000], return_tensors="pt").input_ids[0]
    # two 64-token rows, three steps, adapters on the last three of the 30 layers only: backward through
    # bitsandbytes' 4-bit matmuls on CPU costs ~13 s a row over all layers (4x96 tokens x 6 steps with
    # adapters everywhere took 466 s, a third of the suite); it stops at the lowest adapted layer
    batch = torch.stack([ids[i * 64:(i + 1) * 64] for i in range(2)])
    probe = ids[2000:2064].unsqueeze(0)

    model = AutoModelForCausalLM.from_pretrained(q.path)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == len(q.plan.quantized) == 208
    base_logits = _logits(model, probe)

    model = AutoModelForCausalLM.from_pretrained(q.path)  # fresh: eval on CPU repacks weights in place
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      layers_to_transform=[27, 28, 29])
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 3  # A and B of seven projections in three layers
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=2e-3)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses

    tuned_logits = _logits(model, probe)
    assert not torch.equal(tuned_logits, base_logits)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(q.path), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, probe), tuned_logits, rtol=0, atol=1e-3)

    again = AutoModelForCausalLM.from_pretrained(q.path)
    assert torch.equal(_logits(again, probe), base_logits)
