"""The Task base class: every optional capability has a default, so callers never probe for it."""
import pytest
import torch

from matrec.data.tasks import TASKS, Task, build_task
from support import SHAKESPEARE_FILE


class Minimal(Task):
    """Only what a task must define: batches and a loss."""

    name = "minimal"
    input_size = output_size = 1

    def get_batch(self, split, batch_size, generator):
        x = torch.randn(batch_size, 3, 1, generator=generator)
        return x, x

    def loss(self, output, target):
        return (output - target).pow(2).mean()


def test_a_minimal_task_gets_every_optional_capability_from_the_base():
    task = Minimal()
    assert not task.stream and not task.has_vocabulary
    assert task.tokenizer_json() is None and task.state_dict() == {}
    task.reset("val")              # nothing to rewind
    task.load_state_dict({})
    with pytest.raises(TypeError, match="task 'minimal' has no vocabulary"):
        task.encode("ab")
    with pytest.raises(TypeError, match="task 'minimal' has no vocabulary"):
        task.decode([0])
    with pytest.raises(ValueError, match="no state to load"):
        task.load_state_dict({"cursor": 1})


def test_only_the_language_model_tasks_have_a_vocabulary():
    ours = [n for n in TASKS.names() if TASKS.get(n).__module__.startswith("matrec.")]  # not tests' tasks
    text = [n for n in ours if TASKS.get(n).has_vocabulary]
    assert sorted(text) == ["documents", "passkey", "shakespeare", "shakespeare_stream", "text", "text_stream"]
    if SHAKESPEARE_FILE.exists():
        task = build_task("shakespeare", seq_len=8, path=str(SHAKESPEARE_FILE))
        assert task.decode(task.encode("To be")) == "To be" and task.tokenizer_json() is not None
