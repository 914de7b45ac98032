"""A stage's backward in two passes, for the zero-bubble schedules (Qi et al., 2023): B, the
gradient of the stage's input, which the previous stage is waiting for, and W, the gradients
of its weights, which no other stage needs and which a schedule runs later, in what would
otherwise be idle time.

The split is made on the autograd graph, not in the layers, so every layer splits the same
way (tensor- and sequence-parallel linears, the vocab-parallel embedding and loss, fused
kernels, experts, recomputed blocks) and a new layer needs nothing. B runs autograd towards
the input only and keeps the graph. On the way it records the gradient arriving at every
node where a weight's branch leaves the input's path (for a linear, its matmul node, whose
input gradient B computes and whose weight gradient it skips). W later restarts autograd at
those nodes with those gradients, towards the weights only, so it computes each weight
gradient once and the input's path not again. A node that computes several outputs in one
call (a custom autograd Function such as the fused loss) is run by both passes: correct,
but its backward costs twice. torch.distributed.pipelining splits the same way.

W accumulates into `.grad` through autograd, so the gradient buffers' hooks (the
data-parallel bucket reduction) fire as they do for one backward.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.autograd.graph import GradientEdge, Node


def _grad_node(t: torch.Tensor) -> Node:
    """The node that receives t's gradient: its grad_fn, or a leaf's AccumulateGrad."""
    return t.grad_fn if t.grad_fn is not None else t.view_as(t).grad_fn.next_functions[0][0]


def _parents(root: Node) -> dict[Node, list[Node]]:
    """For every node of the graph below root, the nodes that pass it a gradient."""
    parents: dict[Node, list[Node]] = defaultdict(list)
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is not None:
                parents[child].append(node)
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    return parents


def _upwards(starts: list[Node], parents: dict[Node, list[Node]], stop: set[Node]) -> tuple[set[Node], set[Node]]:
    """(the nodes above `starts` up to the root, the nodes of `stop` where the walk ended)."""
    seen, hit, stack = set(starts), set(), list(starts)
    while stack:
        for parent in parents.get(stack.pop(), []):
            if parent in stop:
                hit.add(parent)
            elif parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen, hit


class WeightGradients:
    """What B leaves for W: per group of weights, the nodes their branches leave the input's
    path at, and the gradients that arrived there."""

    def __init__(self, groups: list[tuple[list[torch.Tensor], list[Node]]], grads: dict[Node, tuple],
                 full: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        self.groups, self.grads, self.full = groups, grads, full

    def run(self) -> None:
        """W: accumulate every weight's gradient into its .grad, then free the graph."""
        if self.full is not None:  # the first stage: nothing was split, W is the whole backward
            output, grad = self.full
            torch.autograd.backward(output, grad_tensors=grad)
        for params, nodes in self.groups:
            roots, seeds = [], []
            for node in nodes:
                for i, g in enumerate(self.grads.get(node, ())):
                    if g is not None:
                        roots.append(GradientEdge(node, i))
                        seeds.append(g)
            if not roots:
                continue
            # A node of the group below another would also receive the gradient flowing down
            # from it: pin every node's incoming gradient to what B saw, or it counts twice.
            pins = [node.register_prehook(lambda _, saved=self.grads[node]: saved)
                    for node in nodes if len(nodes) > 1 and node in self.grads]
            try:
                torch.autograd.backward(roots, grad_tensors=seeds, inputs=params)
            finally:
                for pin in pins:
                    pin.remove()
        self.groups, self.grads, self.full = [], {}, None


def backward_input(output: torch.Tensor, output_grad: torch.Tensor | None,
                   input_tensor: torch.Tensor | None,
                   params: list[torch.Tensor]) -> tuple[torch.Tensor | None, WeightGradients]:
    """B: the gradient of `input_tensor` (None on the first stage, whose input is token ids),
    and what W needs to finish the gradients of `params` later."""
    if input_tensor is None:
        return None, WeightGradients([], {}, full=(output, output_grad))
    root = output.grad_fn
    parents = _parents(root)
    input_path, _ = _upwards([_grad_node(input_tensor)], parents, set())
    param_nodes = {}
    for p in params:
        if p.requires_grad:
            node = _grad_node(p)
            if node in parents:  # used by this forward
                param_nodes[node] = p
    # Weights whose branches meet the input's path at a common node form one group: W runs
    # autograd once per group, so no node runs twice.
    group_of: dict[Node, int] = {}
    groups: list[tuple[list[torch.Tensor], set[Node]]] = []
    for node, p in param_nodes.items():
        _, boundary = _upwards([node], parents, input_path)
        joined = sorted({group_of[b] for b in boundary if b in group_of})
        params_in, nodes_in = [p], set(boundary)
        for g in joined:
            params_in += groups[g][0]
            nodes_in |= groups[g][1]
            groups[g] = ([], set())
        groups.append((params_in, nodes_in))
        for b in nodes_in:
            group_of[b] = len(groups) - 1
    groups = [(ps, list(ns)) for ps, ns in groups if ps]
    grads: dict[Node, tuple] = {}
    hooks = [node.register_prehook(lambda grad_outputs, node=node: grads.__setitem__(node, grad_outputs))
             for _, nodes in groups for node in nodes]
    try:
        (input_grad,) = torch.autograd.grad(output, input_tensor, grad_outputs=output_grad, retain_graph=True)
    finally:
        for hook in hooks:
            hook.remove()
    return input_grad, WeightGradients(groups, grads)
