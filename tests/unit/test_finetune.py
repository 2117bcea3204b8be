"""The fine-tuning helpers (`swarm.finetune`) and the prompts' files (`swarm.tuning`): what is trained on, how
batches are padded, how answers are scored, and that saved soft prompts load here and into peft."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarm.errors import ConfigError
from swarm.finetune import DEFAULT_DATA, ChatExample, batch_of, encode, first_word, load_examples, split
from swarm.tuning import PromptTuning


def test_the_shipped_dataset_holds_a_few_hundred_labelled_reviews():
    examples = load_examples(DEFAULT_DATA)
    assert len(examples) >= 200
    assert {e.answer for e in examples} == {"positive", "negative"}
    train, held_out = split(examples, 0.2)
    assert len(held_out) == round(0.2 * len(examples)) and not {e.prompt[0]["content"] for e in held_out} & {
        e.prompt[0]["content"] for e in train}


def test_a_malformed_dataset_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + json.dumps({"messages": [{"role": "assistant", "content": 3}]}) + "\n")
    with pytest.raises(ConfigError, match="line 2: not a chat example"):
        load_examples(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_examples(tmp_path / "missing.jsonl")


def test_only_the_answer_is_trained_on_and_batches_are_left_padded(tokenizer):
    example = ChatExample([{"role": "user", "content": "Review: great."}], "positive")
    ids, labels = encode(tokenizer, example)
    answer = tokenizer("positive", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[-len(answer):] == answer and labels[-len(answer):] == answer
    assert set(labels[:-len(answer)]) == {-100}
    short = ([5, 6], [-100, 6])
    batch, mask, targets = batch_of([(ids, labels), short], pad_id=0)
    assert batch.shape == (2, len(ids)) and batch[1, -2:].tolist() == [5, 6] and mask[1].sum() == 2
    assert targets[1, :-2].eq(-100).all() and targets[1, -1] == 6


@pytest.mark.parametrize("text, word", [(" Positive.", "positive"), ("negative!\nmore", "negative"), ("", "")])
def test_answers_are_scored_by_their_first_word(text, word):
    assert first_word(text) == word


def test_saved_prompts_load_back_and_into_peft_on_a_local_model(tmp_path):
    tuning = PromptTuning("deep_prompt", 3, 32, 2)
    with torch.no_grad():
        tuning.deep_prompts.normal_()
    saved = tuning.save(tmp_path / "p")
    loaded = PromptTuning.load(saved)
    assert loaded.kind == "deep_prompt" and torch.equal(loaded.prompt_embeddings, tuning.prompt_embeddings)
    assert torch.equal(loaded.deep_prompts, tuning.deep_prompts)

    from peft import PeftModel

    local = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    peft_model = PeftModel.from_pretrained(local, str(saved))
    assert torch.equal(peft_model.get_prompt_embedding_to_save("default"), tuning.prompt_embeddings.detach())


def test_prompts_saved_for_another_model_are_refused_before_they_reach_a_peer():
    tuning = PromptTuning("deep_prompt", 3, 32, 2)
    tuning.check_fits(32, 2)
    with pytest.raises(ConfigError, match="deep prompts for 2 blocks, but the model has 30"):
        tuning.check_fits(32, 30)
    with pytest.raises(ConfigError, match="32 wide, but the model's hidden size is 576"):
        PromptTuning("prompt", 3, 32, 2).check_fits(576, 2)


def test_unknown_tuning_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown tuning 'lora'"):
        PromptTuning("lora", 4, 8, 2)
    with pytest.raises(ConfigError, match="holds no prompts"):
        PromptTuning.load(tmp_path)
