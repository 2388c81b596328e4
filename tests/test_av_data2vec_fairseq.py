"""AV-data2vec's fairseq glue: registry, pre-training model (EMA teacher, targets, loss
positions), regression criterion, seq2seq model (incremental decoding, beam search through the
task's generator, loading a pre-training checkpoint) and the speech tasks on real media files."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fairseq import criterions, models, tasks
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
from fairseq.data import Dictionary
from fairseq.dataclass.configs import GenerationConfig
from fairseq.dataclass.initialize import add_defaults, hydra_init
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

import avplugins  # noqa: F401  (registers the plugin)
from avplugins.criterions.av_data2vec_regression import (
    AVData2VecRegressionConfig,
    AVData2VecRegressionCriterion,
    RepresentationCollapseError,
)
from avplugins.data.manifest import write_labels, write_manifest
from avplugins.data.media import write_audio, write_video
from avplugins.models.av_data2vec import AVData2VecModel, annealed_decay, mean_channel_std
from avplugins.models.av_data2vec_seq2seq import AVData2VecSeq2SeqModel
from preprocess.build_vocab import build_vocab

TINY_PRETRAIN = {"_name": "av_data2vec_tiny", "encoder_layerdrop": 0.0}
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "av_data2vec", "conf")
RECIPES = [("pretrain", name) for name in ("tiny_synthetic", "base_lrs3_433h", "base_1759h", "large_1759h")] + [
    ("finetune", name) for name in ("tiny_synthetic", "base_30h", "base_433h", "large_30h", "large_433h")
]
WORDS = ["red", "green", "blue", "one", "two", "three", "soon", "again"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads per process are several
    times slower (oversubscription), and these models are too small to gain from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- helpers --------------------------------------------------------------------------------
def build(model_cfg: dict, task=None):
    """A model through fairseq's registry, as the trainer builds it."""
    torch.manual_seed(0)
    return models.build_model(OmegaConf.create(model_cfg), task)


def av_batch(batch_size=3, steps=24, size=24, lengths=(24, 20, 16), seed=0):
    """Hand-made net_input: audio (B, T, 104), video (B, 1, T, size, size), padding (B, T)."""
    generator = torch.Generator().manual_seed(seed)
    padding_mask = torch.arange(steps)[None, :] >= torch.tensor(lengths)[:, None]
    audio = torch.randn(batch_size, steps, 104, generator=generator).masked_fill(padding_mask[..., None], 0)
    video = torch.randn(batch_size, 1, steps, size, size, generator=generator)
    video = video.masked_fill(padding_mask[:, None, :, None, None], 0)
    return {"audio": audio, "video": video, "padding_mask": padding_mask}


def target_dictionary() -> Dictionary:
    dictionary = Dictionary()
    for symbol in ["▁a", "▁b", "▁c", "d", "e"]:
        dictionary.add_symbol(symbol)
    return dictionary


def tiny_seq2seq(**overrides) -> AVData2VecSeq2SeqModel:
    task = SimpleNamespace(target_dictionary=target_dictionary())
    return build({"_name": "av_data2vec_seq2seq_tiny", "encoder_layerdrop": 0.0, **overrides}, task)


def save_pretraining_checkpoint(model: AVData2VecModel, path, model_name=None, drop_keys=()) -> None:
    """A checkpoint as fairseq's trainer writes it (the parts loading reads), optionally
    claiming another model name or missing some weights."""
    model_cfg = OmegaConf.to_container(OmegaConf.create(model.cfg), enum_to_str=True)
    model_cfg["_name"] = model_name or model_cfg["_name"]
    weights = {key: value for key, value in model.state_dict().items() if key not in drop_keys}
    state = {
        "args": None,
        "cfg": {"model": model_cfg},
        "model": weights,
        "optimizer_history": [
            {"criterion_name": "AVData2VecRegressionCriterion", "optimizer_name": "Adam",
             "lr_scheduler_state": {"best": None}, "num_updates": 7}
        ],
        "extra_state": {"train_iterator": {"epoch": 1}},
    }
    torch.save(state, path)


def pretrained_tiny(tmp_path):
    """(pre-training model with a teacher that differs from the student, its checkpoint path)."""
    model = build(TINY_PRETRAIN)
    model.train()
    model.set_num_updates(0)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            parameter.add_(0.01)  # the student moves away from its teacher copy
    path = tmp_path / "pretrain.pt"
    save_pretraining_checkpoint(model, path)
    return model, path


# --- registry -------------------------------------------------------------------------------
def test_architectures_are_registered_with_the_spec_sizes():
    base = models.MODEL_DATACLASS_REGISTRY["av_data2vec_base"]()
    large = models.MODEL_DATACLASS_REGISTRY["av_data2vec_large"]()
    assert (base.encoder_layers, base.encoder_embed_dim, base.encoder_ffn_embed_dim, base.encoder_attention_heads) == (12, 768, 3072, 12)
    assert (large.encoder_layers, large.encoder_embed_dim, large.encoder_ffn_embed_dim, large.encoder_attention_heads) == (24, 1024, 4096, 16)
    assert (base.mask_prob, base.mask_length, base.average_top_k_layers) == (0.5, 10, 8)
    assert (base.ema_decay, base.ema_end_decay, base.ema_anneal_end_step) == (0.999, 0.9999, 30000)
    s2s_base = models.MODEL_DATACLASS_REGISTRY["av_data2vec_seq2seq_base"]()
    s2s_large = models.MODEL_DATACLASS_REGISTRY["av_data2vec_seq2seq_large"]()
    assert (s2s_base.decoder_layers, s2s_base.decoder_embed_dim, s2s_base.decoder_attention_heads) == (6, 768, 4)
    assert (s2s_large.decoder_layers, s2s_large.decoder_embed_dim, s2s_large.decoder_attention_heads) == (9, 1024, 8)
    assert s2s_large.encoder_layers == 24


def test_tiny_architectures_build_through_fairseq_registry():
    pretrain = build({"_name": "av_data2vec_tiny"})
    assert isinstance(pretrain, AVData2VecModel)
    assert len(pretrain.backbone.encoder.blocks) == pretrain.cfg.encoder_layers == 4
    seq2seq = tiny_seq2seq()
    assert isinstance(seq2seq, AVData2VecSeq2SeqModel)
    assert len(seq2seq.decoder.layers) == 2
    assert seq2seq.decoder.embed_tokens.num_embeddings == len(target_dictionary())
    overridden = build({"_name": "av_data2vec_tiny", "encoder_layers": 3, "average_top_k_layers": 2})
    assert len(overridden.backbone.encoder.blocks) == 3


def test_top_k_larger_than_depth_is_rejected():
    with pytest.raises(ValueError, match="average_top_k_layers=8 must be between 1 and model.encoder_layers=4"):
        build({"_name": "av_data2vec_tiny", "average_top_k_layers": 8})


# --- pre-training model ---------------------------------------------------------------------
def test_pretraining_forward_backward_trains_student_not_teacher():
    model = build(TINY_PRETRAIN)
    model.train()
    model.set_num_updates(0)
    criterion = AVData2VecRegressionCriterion(None, AVData2VecRegressionConfig())
    batch = av_batch()
    torch.manual_seed(1)
    loss, sample_size, log = criterion(model, {"net_input": batch, "nsentences": 3, "ntokens": 60})
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    torch.manual_seed(1)  # the same masks and modality draws again
    assert sample_size == int(model(**batch)["loss_mask"].sum()) > 0
    assert log["ema_decay"] == pytest.approx(0.999)
    for name, parameter in [
        ("regression head", model.regression_head.weight),
        ("audio frontend", model.backbone.audio_frontend.proj.weight),
        ("last block", model.backbone.encoder.blocks[-1].mlp.fc2.weight),
    ]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    teacher = model.ema.model
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not any(p is q for p in teacher.parameters() for q in model.parameters())
    assert not any(name.startswith("ema") for name, _ in model.named_parameters())


def test_targets_need_no_graph():
    model = build(TINY_PRETRAIN)
    model.train()
    output = model(**av_batch())
    assert not output["targets"].requires_grad
    assert output["targets"].grad_fn is None
    assert output["predictions"].requires_grad
    assert output["predictions"].shape == output["targets"].shape == (output["num_positions"], 128)


def test_loss_positions_masked_steps_for_audio_all_valid_steps_for_video_only():
    model = build({**TINY_PRETRAIN, "student_p_av_start": 0.0, "student_p_av_end": 0.0,
                   "student_p_audio_start": 0.5, "student_p_audio_end": 0.5})
    model.train()
    batch = av_batch(batch_size=8, lengths=(24, 20, 16, 24, 22, 18, 24, 21))
    torch.manual_seed(3)
    output = model(**batch)
    valid = ~batch["padding_mask"]
    use_audio = output["use_audio"]
    assert use_audio.any() and (~use_audio).any()
    assert torch.equal(output["use_video"], ~use_audio)
    assert torch.equal(output["loss_mask"][use_audio], (output["mask"] & valid)[use_audio])
    assert torch.equal(output["loss_mask"][~use_audio], valid[~use_audio])
    assert not (output["loss_mask"] & batch["padding_mask"]).any()
    assert output["mask"][use_audio].any()


def test_teacher_targets_are_top_k_instance_normed_ffn_outputs_of_the_audio_only_teacher():
    model = build(TINY_PRETRAIN)
    model.train()
    model.set_num_updates(0)
    with torch.no_grad():  # the student now differs from its teacher
        for block in model.backbone.encoder.blocks:
            block.mlp.fc2.weight.mul_(3.0)
    batch = av_batch()
    padding_mask = batch["padding_mask"]
    everyone = torch.ones(3, dtype=torch.bool)
    targets = model.compute_targets(batch["audio"], batch["video"], padding_mask, None, everyone, ~everyone)

    teacher = model.ema.model.eval()
    with torch.no_grad():
        x = model.backbone.embed(batch["audio"], None)
        layers = teacher(x, padding_mask, return_layer_ffn_outputs=True)["layer_results"]
    expected = np.zeros(targets.shape)
    k = model.cfg.average_top_k_layers
    for layer in layers[-k:]:
        for row, length in enumerate((~padding_mask).sum(1).tolist()):
            values = layer[row, :length].double().numpy()
            normed = (values - values.mean(0)) / np.sqrt(values.var(0) + 1e-5)
            expected[row, :length] += normed / k
    np.testing.assert_allclose(targets.numpy(), expected, atol=2e-4)

    other_video = model.compute_targets(batch["audio"], -batch["video"], padding_mask, None, everyone, ~everyone)
    assert torch.equal(targets, other_video)  # the audio-only teacher never sees video
    student_layers = model.backbone.encoder(x, padding_mask, return_layer_ffn_outputs=True)["layer_results"]
    assert not np.allclose(student_layers[-1].detach().numpy(), layers[-1].numpy(), atol=1e-3)


def test_teacher_is_the_exponential_moving_average_of_the_student():
    model = build({**TINY_PRETRAIN, "ema_decay": 0.9, "ema_end_decay": 0.9})
    model.train()
    model.set_num_updates(0)
    before = {k: v.clone() for k, v in model.ema.model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.backbone.encoder.parameters():
            parameter.add_(1.0)
    student = model.backbone.encoder.state_dict()
    model.set_num_updates(1)
    after = model.ema.model.state_dict()
    for key, old in before.items():
        if key.startswith("pos_conv."):  # ema_layers_only: copied, not averaged
            torch.testing.assert_close(after[key], student[key])
        else:
            torch.testing.assert_close(after[key], 0.9 * old + 0.1 * student[key], rtol=0, atol=1e-6)
    model.set_num_updates(1)  # the same update again (gradient accumulation): no second step
    for key, value in model.ema.model.state_dict().items():
        torch.testing.assert_close(value, after[key])


def test_whole_backbone_teacher_averages_the_frontends_too():
    model = build({**TINY_PRETRAIN, "ema_transformer_only": False, "ema_decay": 0.5, "ema_end_decay": 0.5})
    model.train()
    model.set_num_updates(0)
    old = model.ema.model.audio_frontend.proj.weight.clone()
    with torch.no_grad():
        model.backbone.audio_frontend.proj.weight.add_(2.0)
    model.set_num_updates(1)
    torch.testing.assert_close(model.ema.model.audio_frontend.proj.weight, old + 1.0)
    output = model(**av_batch())
    assert output["targets"].shape == output["predictions"].shape


def test_teacher_decay_anneals_linearly_then_stays():
    assert annealed_decay(0.999, 0.9999, 15000, 30000) == pytest.approx(0.99945)
    model = build({**TINY_PRETRAIN, "ema_anneal_end_step": 100})
    model.train()
    for update, expected in [(0, 0.999), (50, 0.99945), (100, 0.9999), (250, 0.9999)]:
        model.set_num_updates(update)
        assert model.ema.get_decay() == pytest.approx(expected, abs=1e-12)


def test_teacher_weights_round_trip_through_the_state_dict():
    model = build(TINY_PRETRAIN)
    model.train()
    model.set_num_updates(0)
    with torch.no_grad():
        for parameter in model.backbone.encoder.parameters():
            parameter.add_(0.5)
    model.set_num_updates(1)
    state = model.state_dict()
    assert any(key.startswith("_ema.") for key in state)
    fresh = build(TINY_PRETRAIN)
    fresh.load_state_dict(state)
    for key, value in model.ema.model.state_dict().items():
        torch.testing.assert_close(fresh.ema.model.state_dict()[key], value)
    assert not any(torch.equal(fresh.ema.model.state_dict()[k], v) for k, v in fresh.backbone.encoder.state_dict().items()
                   if not k.startswith("pos_conv.") and v.numel() > 1)


@pytest.mark.parametrize("checkpoint_has_counter", [True, False])
def test_teacher_resumes_like_an_uninterrupted_run(checkpoint_has_counter):
    """fairseq's resume order: ``set_num_updates(N)`` on a fresh model, then the weights saved
    after update N, then the task's ``set_num_updates(N)`` before update N + 1, which must take
    the EMA step an uninterrupted run takes there, with the same decay. A checkpoint without
    ``_ema_updates`` (written before it existed) resumes the same way."""
    config = {**TINY_PRETRAIN, "ema_decay": 0.5, "ema_end_decay": 0.9, "ema_anneal_end_step": 4}
    whole = build(config)
    whole.train()
    for update in range(2):  # the task calls set_num_updates(N) before optimizer update N + 1
        whole.set_num_updates(update)
        with torch.no_grad():
            for parameter in whole.backbone.parameters():
                parameter.add_(0.1 * (update + 1))
    # a checkpoint after update 2 (copies: the teacher's tensors are updated in place)
    saved = {key: value.clone() for key, value in whole.state_dict().items()}
    assert int(saved["_ema_updates"]) == 1  # the teacher was last stepped at update 1
    if not checkpoint_has_counter:
        del saved["_ema_updates"]
    whole.set_num_updates(2)

    resumed = build(config)
    resumed.train()
    resumed.set_num_updates(2)
    resumed.load_state_dict(saved)
    assert resumed.ema.get_decay() == pytest.approx(annealed_decay(0.5, 0.9, 1, 4))
    resumed.set_num_updates(2)
    assert resumed.ema.get_decay() == whole.ema.get_decay() == pytest.approx(annealed_decay(0.5, 0.9, 2, 4))
    for key, value in whole.ema.model.state_dict().items():
        assert torch.equal(resumed.ema.model.state_dict()[key], value), key
    resumed.set_num_updates(2)  # no second step for the same update
    assert int(resumed.state_dict()["_ema_updates"]) == 2
    for key, value in whole.ema.model.state_dict().items():
        assert torch.equal(resumed.ema.model.state_dict()[key], value), key


def test_audio_only_teacher_refuses_video_only_batches():
    model = build(TINY_PRETRAIN)
    batch = av_batch()
    with pytest.raises(ValueError, match="teacher is configured never to see video"):
        model(video=batch["video"], padding_mask=batch["padding_mask"])


# --- criterion ------------------------------------------------------------------------------
class FixedOutputs(nn.Module):
    """Stands in for the model: returns given predictions / targets."""

    def __init__(self, predictions, targets, num_updates):
        super().__init__()
        self.outputs = {
            "predictions": predictions, "targets": targets, "num_positions": len(targets),
            "target_var": mean_channel_std(targets), "pred_var": mean_channel_std(predictions),
            "ema_decay": 0.9995, "num_updates": num_updates,
        }

    def forward(self, **net_input):
        return self.outputs


def run_criterion(model, **cfg):
    criterion = AVData2VecRegressionCriterion(None, AVData2VecRegressionConfig(**cfg))
    return criterion(model, {"net_input": {}, "nsentences": 2, "ntokens": 10})


def test_regression_loss_known_values():
    predictions = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 3.0, 4.0], [0.5, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, -1.0]])
    loss, sample_size, log = run_criterion(FixedOutputs(predictions, targets, 0))
    assert sample_size == 3
    assert loss.item() == pytest.approx((4.0 + 0.25 + 4.0) / 2.0)  # L2 summed, / sqrt(D = 4)
    smooth, _, _ = run_criterion(FixedOutputs(predictions, targets, 0), loss_beta=1.0, loss_scale=1.0)
    assert smooth.item() == pytest.approx(1.5 + 0.125 + 1.5)  # |d| - 0.5 for |d| >= 1, d^2 / 2 below
    assert log["ema_decay"] == 0.9995


def test_collapsed_targets_stop_training_with_a_clear_error():
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randn(50, 8, generator=generator)
    collapsed = torch.full((50, 8), 0.3) + 1e-3 * torch.randn(50, 8, generator=generator)
    run_criterion(FixedOutputs(predictions, collapsed, 4999), collapse_check_after_updates=5000)
    with pytest.raises(RepresentationCollapseError, match=r"target_var = .* < criterion.min_target_var = 0.1 at update 5000"):
        run_criterion(FixedOutputs(predictions, collapsed, 5000), collapse_check_after_updates=5000)
    run_criterion(FixedOutputs(predictions, collapsed, 5000), min_target_var=0.0, min_pred_var=0.0)
    with pytest.raises(RepresentationCollapseError, match="pred_var"):
        run_criterion(FixedOutputs(collapsed, predictions, 6000))
    evaluating = FixedOutputs(predictions, collapsed, 6000).eval()
    run_criterion(evaluating)  # validation reports, only training stops


# --- seq2seq model --------------------------------------------------------------------------
def test_seq2seq_forward_and_frozen_encoder():
    model = tiny_seq2seq(freeze_finetune_updates=2)
    model.train()
    batch = av_batch()
    tokens = torch.tensor([[2, 4, 5, 6], [2, 7, 8, 1], [2, 4, 1, 1]])
    logits, _ = model(prev_output_tokens=tokens, **batch)
    assert logits.shape == (3, 4, len(target_dictionary()))
    logits.sum().backward()
    assert model.encoder.backbone.audio_frontend.proj.weight.grad is None
    assert model.decoder.layers[0].fc1.weight.grad is not None
    model.zero_grad()
    model.set_num_updates(2)
    model(prev_output_tokens=tokens, **batch)[0].sum().backward()
    assert model.encoder.backbone.audio_frontend.proj.weight.grad is not None


def hybrid_ctc_criterion(model, ctc_weight):
    """fairseq's own label_smoothed_cross_entropy_with_ctc, built through its registry."""
    cfg = OmegaConf.create({"_name": "label_smoothed_cross_entropy_with_ctc", "label_smoothing": 0.1,
                            "sentence_avg": True, "report_accuracy": True, "ctc_weight": ctc_weight})
    task = SimpleNamespace(target_dictionary=model.decoder.dictionary)
    return criterions.build_criterion(cfg, task)


def test_ctc_head_loss_equals_the_sum_over_utterances_run_alone():
    """The hybrid loss is the label-smoothed CE plus ctc_weight times the CTC loss of every
    utterance, each computed on its own unpadded encoder output against its tokens without
    eos: padding, lengths and the eos are handled."""
    model = tiny_seq2seq(ctc_head=True, activation_dropout=0.0).eval()
    lengths = (24, 20, 16)
    batch = {**av_batch(lengths=lengths), "video": None}
    tokens = [[4, 5, 6, 2], [7, 8, 2], [4, 2]]  # eos-terminated, as the task writes them
    target = torch.tensor([row + [1] * (4 - len(row)) for row in tokens])
    prev_output_tokens = torch.tensor([[2] + row[:-1] + [1] * (4 - len(row)) for row in tokens])
    sample = {"net_input": {**batch, "prev_output_tokens": prev_output_tokens}, "target": target,
              "target_lengths": torch.tensor([len(row) for row in tokens]), "ntokens": 9}
    with torch.no_grad():
        hybrid, _, log = hybrid_ctc_criterion(model, 0.3)(model, sample)
        attention_only, _, _ = hybrid_ctc_criterion(model, 0.0)(model, sample)
        expected_ctc = 0.0
        for index, (length, row) in enumerate(zip(lengths, tokens)):
            encoder_out = model.encoder(audio=batch["audio"][index : index + 1, :length])
            log_probs = model.ctc_projection(encoder_out["encoder_out"][0]).log_softmax(-1)
            expected_ctc += nn.functional.ctc_loss(
                log_probs, torch.tensor([row[:-1]]), [length], [len(row) - 1], blank=0, reduction="sum"
            )
    assert model.decoder.dictionary.bos() == 0  # the CTC blank, never a target
    torch.testing.assert_close(hybrid - attention_only, 0.3 * expected_ctc, atol=1e-4, rtol=1e-5)
    assert log["ctc_loss"] == pytest.approx(0.3 * expected_ctc.item(), rel=1e-5)
    hybrid_ctc_criterion(model, 0.3)(model.train(), sample)[0].backward()
    assert model.ctc_projection.weight.grad.abs().sum() > 0
    assert model.encoder.backbone.audio_frontend.proj.weight.grad.abs().sum() > 0


def test_ctc_criterion_without_a_ctc_head_says_what_to_set():
    model = tiny_seq2seq().eval()
    assert model.ctc_projection is None and "ctc_projection.weight" not in model.state_dict()
    tokens = torch.tensor([[4, 2]])
    sample = {"net_input": {**av_batch(batch_size=1, lengths=(24,)), "prev_output_tokens": tokens},
              "target": tokens, "target_lengths": torch.tensor([2]), "ntokens": 2}
    with pytest.raises(ValueError, match="model.ctc_head=true"):
        hybrid_ctc_criterion(model, 0.3)(model, sample)


def test_fine_tuning_span_masks_only_in_training():
    batch = {**av_batch(), "video": None}  # (the video frontend's batch norm differs in training)
    for apply_mask in (False, True):
        model = tiny_seq2seq(activation_dropout=0.0, apply_mask=apply_mask, mask_prob=0.8, mask_length=4)
        with torch.no_grad():
            training = model.encoder.train()(**batch)["encoder_out"][0]
            evaluating = model.encoder.eval()(**batch)["encoder_out"][0]
        assert torch.allclose(training, evaluating, atol=1e-5) != apply_mask


def test_incremental_decoding_equals_full_decoding():
    model = tiny_seq2seq().eval()
    batch = av_batch()
    tokens = torch.tensor([[2, 4, 5, 6, 7], [2, 7, 8, 4, 4], [2, 4, 6, 8, 5]])
    with torch.no_grad():
        encoder_out = model.encoder(audio=batch["audio"], padding_mask=batch["padding_mask"])
        full = model.decoder(tokens, encoder_out=encoder_out)[0]
        state = {}
        for step in range(tokens.shape[1]):
            incremental = model.decoder(tokens[:, : step + 1], encoder_out=encoder_out, incremental_state=state)[0]
            torch.testing.assert_close(incremental[:, 0], full[:, step], atol=1e-5, rtol=1e-5)


def test_reorder_encoder_out_selects_batch_rows():
    model = tiny_seq2seq().eval()
    batch = av_batch()
    with torch.no_grad():
        encoder_out = model.encoder(**batch)
    order = torch.tensor([2, 0, 2, 1])
    reordered = model.encoder.reorder_encoder_out(encoder_out, order)
    assert torch.equal(reordered["encoder_out"][0], encoder_out["encoder_out"][0][:, order])
    assert torch.equal(reordered["encoder_padding_mask"][0], batch["padding_mask"][order])
    assert reordered["encoder_out"][0].shape == (24, 4, 128)


# --- speech tasks on real media files -------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Nine utterances (mp4 + wav, 32-44 frames) with transcripts, an spm model and dict."""
    root = tmp_path_factory.mktemp("speech")
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for index in range(9):
        num_frames = 32 + 4 * (index % 4)
        frames = rng.integers(0, 255, size=(num_frames, 96, 96), dtype=np.uint8)
        samples = (0.3 * np.sin(np.arange(num_frames * 640) * 0.05 * (index + 1))).astype(np.float32)
        write_video(root / f"clip{index}.mp4", frames, fps=25)
        write_audio(root / f"clip{index}.wav", samples)
        rows.append((f"clip{index}", f"clip{index}.mp4", f"clip{index}.wav", num_frames, len(samples)))
        labels.append(" ".join(rng.choice(WORDS, size=3)))
    for split in ("train", "test"):
        write_manifest(str(root / f"{split}.tsv"), str(root), rows)
        write_labels(str(root / f"{split}.wrd"), labels)
    build_vocab(str(root / "train.wrd"), str(root), vocab_size=20)
    return root


def recognition_task(data, **overrides):
    cfg = OmegaConf.create({"_name": "av_speech_recognition", "data": str(data), "seed": 1,
                            "train_subset": "train", **overrides})
    return tasks.setup_task(cfg)


def test_generate_keeps_every_utterance_and_uses_the_trained_modalities(corpus):
    task = recognition_task(corpus, image_size=48, crop_size=44)
    task.load_dataset("test", task_cfg=OmegaConf.create({"modalities": "video"}))
    dataset = task.dataset("test")
    assert dataset.modalities == ["video"]
    iterator = task.get_batch_iterator(dataset, max_sentences=4, required_batch_size_multiple=8)
    batches = list(iterator.next_epoch_itr(shuffle=False))
    assert sorted(i for batch in batches for i in batch["id"].tolist()) == list(range(9))
    assert batches[0]["net_input"]["audio"] is None
    assert batches[0]["net_input"]["video"].shape[-2:] == (44, 44)
    explicit = recognition_task(corpus, modalities="audio")
    explicit.load_dataset("test", task_cfg=OmegaConf.create({"modalities": "video"}))
    assert explicit.dataset("test").modalities == ["audio"]


def test_beam_search_through_task_generator(corpus):
    task = recognition_task(corpus, modalities="audio")
    task.load_dataset("test")
    dataset = task.dataset("test")
    model = build({"_name": "av_data2vec_seq2seq_tiny", "encoder_layerdrop": 0.0}, task).eval()
    sample = dataset.collater([dataset[i] for i in (0, 1, 2)])
    assert sample["net_input"]["padding_mask"].any()  # different lengths: padded

    greedy = task.build_generator([model], GenerationConfig(beam=1, max_len_b=6, min_len=1))
    hypotheses = task.inference_step(greedy, [model], sample)
    eos = task.target_dictionary.eos()
    with torch.no_grad():
        encoder_out = model.encoder(**sample["net_input"])
        for row, hypos in enumerate(hypotheses):
            tokens = torch.tensor([[eos]])
            single = model.encoder.reorder_encoder_out(encoder_out, torch.tensor([row]))
            for step in range(7):
                log_probs = torch.log_softmax(model.decoder(tokens, encoder_out=single)[0][0, -1], -1)
                log_probs[task.target_dictionary.pad()] = -math.inf
                if step == 0:
                    log_probs[eos] = -math.inf
                next_token = eos if step == 6 else int(log_probs.argmax())
                tokens = torch.cat([tokens, torch.tensor([[next_token]])], dim=1)
                if next_token == eos:
                    break
            assert hypos[0]["tokens"].tolist() == tokens[0, 1:].tolist()

    beam = task.build_generator([model], GenerationConfig(beam=3, max_len_b=6))
    together = task.inference_step(beam, [model], sample)
    for row in range(3):
        alone = dataset.collater([dataset[row]])
        assert together[row][0]["tokens"].tolist() == task.inference_step(beam, [model], alone)[0][0]["tokens"].tolist()
        assert len(together[row]) == 3 and together[row][0]["tokens"][-1] == eos


def test_seq2seq_initialised_from_pretraining_checkpoint(tmp_path, corpus):
    pretrained, path = pretrained_tiny(tmp_path)
    task = recognition_task(corpus)
    cfg = OmegaConf.create({"_name": "av_data2vec_seq2seq", "w2v_path": str(path)})  # Base sizes asked
    model = task.build_model(cfg)
    assert cfg.encoder_embed_dim == 128 and cfg.encoder_layers == 4  # adopted from the checkpoint
    assert cfg.w2v_args["_name"] == "av_data2vec_tiny"
    for key, value in pretrained.backbone.state_dict().items():
        torch.testing.assert_close(model.encoder.backbone.state_dict()[key], value)
    os.remove(path)  # the fine-tuned config alone rebuilds the model (as fairseq-generate does)
    rebuilt = task.build_model(cfg, from_checkpoint=True)
    assert len(rebuilt.encoder.backbone.encoder.blocks) == 4


def test_pretraining_checkpoint_errors_are_clear(tmp_path, corpus):
    task = recognition_task(corpus)
    with pytest.raises(FileNotFoundError, match="model.w2v_path=.*does not exist"):
        task.build_model(OmegaConf.create({"_name": "av_data2vec_seq2seq_tiny", "w2v_path": str(tmp_path / "nope.pt")}))
    pretrained, _ = pretrained_tiny(tmp_path)
    save_pretraining_checkpoint(pretrained, tmp_path / "other.pt", model_name="wav2vec2")
    with pytest.raises(ValueError, match="holds a 'wav2vec2' model; it must be an av_data2vec pre-training"):
        task.build_model(OmegaConf.create({"_name": "av_data2vec_seq2seq_tiny", "w2v_path": str(tmp_path / "other.pt")}))
    save_pretraining_checkpoint(pretrained, tmp_path / "partial.pt", drop_keys=["backbone.mask_embedding.embedding"])
    with pytest.raises(ValueError, match=r"do not fit the encoder: missing \['mask_embedding.embedding'\]"):
        task.build_model(OmegaConf.create({"_name": "av_data2vec_seq2seq_tiny", "w2v_path": str(tmp_path / "partial.pt")}))


# --- recipes --------------------------------------------------------------------------------
def compose_recipe(group: str, name: str, overrides=()) -> DictConfig:
    """The config fairseq-hydra-train composes from a recipe (before it merges plugin defaults)."""
    hydra_init(name)
    with initialize_config_dir(config_dir=os.path.join(CONF, group), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def missing_keys(cfg: DictConfig, prefix: str = ""):
    for key in cfg:
        if OmegaConf.is_missing(cfg, key):
            yield prefix + key
        elif not OmegaConf.is_interpolation(cfg, key) and isinstance(cfg[key], DictConfig):
            yield from missing_keys(cfg[key], f"{prefix}{key}.")


@pytest.mark.parametrize("group,name", RECIPES)
def test_recipes_compose_and_require_their_paths(group, name):
    required = {"task.data"} | ({"model.w2v_path"} if group == "finetune" else set())
    assert set(missing_keys(compose_recipe(group, name))) == required
    cfg = compose_recipe(group, name, [f"{key}=/some/path" for key in sorted(required)])
    add_defaults(cfg)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    model_cfg = models.MODEL_DATACLASS_REGISTRY[resolved.model._name]
    assert resolved.criterion._name in CRITERION_DATACLASS_REGISTRY
    assert resolved.task._name == ("av_data2vec_pretraining" if group == "pretrain" else "av_speech_recognition")
    size = name.split("_")[0]
    assert resolved.model.encoder_layers == {"tiny": 4, "base": 12, "large": 24}[size] == model_cfg().encoder_layers
    if group == "finetune":
        assert resolved.criterion.label_smoothing == 0.1
        assert resolved.model.decoder_layers == {"tiny": 2, "base": 6, "large": 9}[size]
    if size == "tiny":
        assert resolved.common.cpu and resolved.distributed_training.distributed_world_size == 1
    if (group, size) == ("finetune", "tiny"):  # babble from the corpus' own training utterances
        assert resolved.task.noise_manifest == "/some/path/train.tsv" and resolved.task.noise_splits == "train"
        assert resolved.model.ctc_head and resolved.criterion.ctc_weight > 0
