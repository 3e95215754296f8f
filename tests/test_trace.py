"""The recorded forward (lightning_bv/_trace.py)."""

from torch import nn


def test_traces_stopped_in_any_order_give_the_compiler_its_stance_back():
    import torch._dynamo  # noqa: F401  (stances exist once Dynamo is imported)

    from lightning_bv._trace import Trace

    net = nn.Sequential(nn.Linear(2, 2))
    a, b = Trace(net).start(), Trace(net).start()  # two callbacks, each tracing the same first step
    assert torch._dynamo.eval_frame._stance.stance == "force_eager"
    a.stop()  # callbacks stop in callback order, not in reverse
    assert torch._dynamo.eval_frame._stance.stance == "force_eager"
    b.stop()
    assert torch._dynamo.eval_frame._stance.stance == "default"
