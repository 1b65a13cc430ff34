import pickle

import numpy as np
import pytest
from rouge_score import rouge_scorer

from sb3_textrl.rewards import RewardFn, RougeReward, TextReward, score_batch
from sb3_textrl.rewards.rouge import ROUGE_METRICS, split_sentences


def _rouge(metric: str, completion: str, reference: str, **kwargs) -> float:
    return float(RougeReward(metric, **kwargs).score([""], [completion], [reference])[0])


# ---------------------------------------------------------------------------------------------------------------
# RougeReward
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ROUGE_METRICS)
def test_rouge_identical_and_disjoint(metric):
    text = "The council approved the new swimming pool. Work starts in spring."
    assert _rouge(metric, text, text) == pytest.approx(1.0)
    assert _rouge(metric, "storm winds flooded a coast", text) == 0.0


def test_rouge_partial_values():
    reference = "the cat sat on the mat"
    # 3 of 6 reference unigrams, all 3 predicted unigrams match: P=1, R=0.5, F=2/3
    assert _rouge("rouge1", "the cat sat", reference) == pytest.approx(2 / 3)
    assert _rouge("rouge1", "the cat sat", reference, measure="precision") == pytest.approx(1.0)
    assert _rouge("rouge1", "the cat sat", reference, measure="recall") == pytest.approx(0.5)
    # Bigrams: "the cat", "cat sat" of 5 reference bigrams
    assert _rouge("rouge2", "the cat sat", reference, measure="recall") == pytest.approx(2 / 5)
    partial = _rouge("rougeL", "a cat sat near the mat", reference)
    assert 0.0 < partial < 1.0


def test_rouge_stemming():
    assert _rouge("rouge1", "running dogs", "the dog runs", use_stemmer=True) > 0
    assert _rouge("rouge1", "dogs running", "dog running", use_stemmer=True) == pytest.approx(1.0)
    assert _rouge("rouge1", "dogs", "dog", use_stemmer=False) == 0.0


def test_rouge_matches_rouge_score_package():
    # Our cached tokenizer must give exactly what rouge-score gives on its own
    pairs = [
        ("Councillors voted 12 to 4 to approve the plans.", "The council approved the plans by 12 votes to 4."),
        ("Running, jumping and swimming events were cancelled!", "Events cancelled: running and swimming."),
        ("", "anything"),
        ("Ünïcode wörds and numbers 3,400", "numbers 3,400 and words"),
    ]
    for metric in ROUGE_METRICS:
        for use_stemmer in (True, False):
            ours = RougeReward(metric, use_stemmer=use_stemmer)
            theirs = rouge_scorer.RougeScorer([metric], use_stemmer=use_stemmer)
            for completion, reference in pairs:
                if metric == "rougeLsum":  # rouge-score wants one sentence a line; RougeReward splits for it
                    completion, reference = "\n".join(split_sentences(completion)), "\n".join(split_sentences(reference))
                expected = theirs.score(reference, completion)[metric].fmeasure
                assert ours.score([""], [completion], [reference])[0] == pytest.approx(expected)


def test_rouge_lsum_splits_sentences():
    reward = RougeReward("rougeLsum")
    completion = "The storm hit the coast. Homes lost power."
    reference = "Homes lost power. The storm hit the coast on Monday."
    joined = reward.score([""], [completion], [reference])[0]
    split = reward.score([""], [completion.replace(". ", ".\n")], [reference.replace(". ", ".\n")])[0]
    assert joined == pytest.approx(split)
    assert split_sentences('He said "no." Then left! Why? Done') == ['He said "no."', "Then left!", "Why?", "Done"]


def test_rouge_empty_completion_scores_zero():
    scores = RougeReward().score(["p", "p"], ["", "   \n"], ["a reference", "another"])
    np.testing.assert_array_equal(scores, [0.0, 0.0])
    assert scores.dtype == np.float64


def test_rouge_missing_reference():
    with pytest.raises(ValueError, match="no references, so ROUGE cannot be used"):
        RougeReward().score(["p", "p"], ["a", "b"], ["ref", None])


def test_rouge_bad_arguments():
    with pytest.raises(ValueError, match="rouge1, rouge2, rougeL, rougeLsum"):
        RougeReward("rouge3")
    with pytest.raises(ValueError, match="precision, recall, fmeasure"):
        RougeReward(measure="f1")
    with pytest.raises(ValueError, match="2 completions and 1 references"):
        RougeReward().score(["p", "p"], ["a", "b"], ["ref"])


def test_rouge_name_repr_pickle():
    assert RougeReward().name == "rouge1"
    assert RougeReward("rougeL", measure="recall").name == "rougeL_recall"
    assert RougeReward(name="custom").name == "custom"
    reward = RougeReward("rouge2", use_stemmer=False)
    assert "rouge2" in repr(reward)
    # Rewards travel to subprocess envs by pickling
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.score([""], ["the cat sat"], ["the cat sat"])[0] == pytest.approx(1.0)


class LengthReward(TextReward):
    name = "length"

    def score(self, prompts, completions, references):
        return np.array([len(c) for c in completions], dtype=np.float32)


def test_text_reward_base():
    with pytest.raises(TypeError):
        TextReward()  # abstract
    reward = LengthReward()
    np.testing.assert_array_equal(reward(["p"], ["abc"], [None]), [3.0])
    assert LengthReward(name="len2").name == "len2"
    assert "length" in repr(reward)


def test_score_batch_accepts_callables_and_types():
    def plain(prompts, completions, references):
        return [1, 2.5, np.float32(3)]

    fn: RewardFn = plain
    values = score_batch(fn, ["a", "b", "c"], ["x", "y", "z"], [None, None, None])
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, [1.0, 2.5, 3.0])
    np.testing.assert_array_equal(score_batch(LengthReward(), ["p"], ["abcd"], [None]), [4.0])
    # Generators and tuples are fine too
    np.testing.assert_array_equal(score_batch(lambda p, c, r: (len(x) for x in c), ["p"] * 2, ["a", "bb"], [None] * 2), [1, 2])
    np.testing.assert_array_equal(score_batch(lambda p, c, r: [True, False], ["p"] * 2, ["a", "b"], [None] * 2), [1, 0])


def test_score_batch_torch_tensor():
    torch = pytest.importorskip("torch")
    values = score_batch(lambda p, c, r: torch.tensor([0.5, 1.0], requires_grad=True), ["p"] * 2, ["a", "b"], [None] * 2)
    np.testing.assert_allclose(values, [0.5, 1.0])
    values = score_batch(lambda p, c, r: torch.tensor([0.5, 1.0], dtype=torch.bfloat16), ["p"] * 2, ["a", "b"], [None] * 2)
    assert values.dtype == np.float64
    np.testing.assert_allclose(values, [0.5, 1.0])


def test_score_batch_wrong_length():
    def too_few(prompts, completions, references):
        return [1.0]

    with pytest.raises(ValueError, match=r"Reward 'too_few' for task 'NewsSummary-v0' returned 1 values for 3 completions"):
        score_batch(too_few, ["p"] * 3, ["a", "b", "c"], [None] * 3, task_id="NewsSummary-v0")
    with pytest.raises(ValueError, match="returned a single value"):
        score_batch(lambda p, c, r: 1.0, ["p"] * 2, ["a", "b"], [None] * 2)
    with pytest.raises(ValueError, match=r"shape \(2, 1\).*flat sequence of 2 floats"):
        score_batch(lambda p, c, r: [[1.0], [2.0]], ["p"] * 2, ["a", "b"], [None] * 2)
    with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
        score_batch(lambda p, c, r: np.ones((2, 1)), ["p"] * 2, ["a", "b"], [None] * 2)
    with pytest.raises(ValueError, match="non-numeric"):  # ragged nesting
        score_batch(lambda p, c, r: [[1.0], [2.0, 3.0]], ["p"] * 2, ["a", "b"], [None] * 2)
    with pytest.raises(ValueError, match="single value"):
        score_batch(lambda p, c, r: np.float32(1.0), ["p"] * 2, ["a", "b"], [None] * 2)
    with pytest.raises(ValueError, match="single value"):
        score_batch(lambda p, c, r: None, ["p"] * 2, ["a", "b"], [None] * 2)
    with pytest.raises(ValueError, match="2 prompts, 3 completions and 3 references"):
        score_batch(too_few, ["p"] * 2, ["a", "b", "c"], [None] * 3)


def test_score_batch_nan_inf():
    with pytest.raises(ValueError, match=r"'<lambda>' for task 'T-v0' returned 2 NaN/inf value\(s\) \(\[1\]=nan, \[2\]=inf\)"):
        score_batch(lambda p, c, r: [0.0, float("nan"), float("inf")], ["p"] * 3, ["a", "b", "c"], [None] * 3, "T-v0")
    reward = LengthReward()
    reward.score = lambda p, c, r: np.array([np.nan])  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="'length'.*NaN/inf.*must be finite"):
        score_batch(reward, ["p"], ["a"], [None])


def test_score_batch_non_numeric():
    with pytest.raises(ValueError, match=r"non-numeric value\(s\) \(\[1\]='0.5'\).*must be a number"):
        score_batch(lambda p, c, r: [1.0, "0.5"], ["p"] * 2, ["a", "b"], [None] * 2, "T-v0")
    with pytest.raises(ValueError, match=r"non-numeric value\(s\) \(\[0\]=None\)"):
        score_batch(lambda p, c, r: [None, 1.0], ["p"] * 2, ["a", "b"], [None] * 2)
    with pytest.raises(ValueError, match="non-numeric"):
        score_batch(lambda p, c, r: ["a", "b"], ["p"] * 2, ["a", "b"], [None] * 2)
    with pytest.raises(ValueError, match="single value"):
        score_batch(lambda p, c, r: "ab", ["p"] * 2, ["a", "b"], [None] * 2)
