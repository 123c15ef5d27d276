"""Likelihood scoring of candidate labels, against a direct log-softmax computation."""

import torch

from peftkit import PromptTuningConfig, get_peft_model
from peftkit.evaluation.scoring import choice_log_likelihoods
from tests.conftest import tiny_model


def test_single_token_choices(char_tokenizer):
    peft_model = get_peft_model(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=3))
    prompts = ["hello", "a much longer prompt", "mid size"]
    scores = choice_log_likelihoods(peft_model, char_tokenizer, prompts, ["x", "y"], batch_size=2, progress=False)
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([char_tokenizer(prompt)["input_ids"]])
        logprobs = torch.log_softmax(peft_model(input_ids=ids).logits[0, -1], -1)
        expected = logprobs[[char_tokenizer("x")["input_ids"][0], char_tokenizer("y")["input_ids"][0]]]
        torch.testing.assert_close(scores[i], expected, atol=1e-5, rtol=1e-5)


def test_multi_token_choices_sum_token_log_probabilities(char_tokenizer):
    peft_model = get_peft_model(tiny_model("gpt2"), PromptTuningConfig(num_virtual_tokens=2))
    prompts = ["ab", "cdef"]
    scores = choice_log_likelihoods(peft_model, char_tokenizer, prompts, ["xy", "z"], batch_size=4, progress=False)
    for i, prompt in enumerate(prompts):
        for c, choice in enumerate(["xy", "z"]):
            p, t = char_tokenizer(prompt)["input_ids"], char_tokenizer(choice)["input_ids"]
            logits = peft_model(input_ids=torch.tensor([p + t])).logits[0]
            logprobs = torch.log_softmax(logits, -1)
            expected = sum(logprobs[len(p) - 1 + k, tok] for k, tok in enumerate(t))
            torch.testing.assert_close(scores[i, c], expected, atol=1e-5, rtol=1e-5)
