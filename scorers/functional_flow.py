"""Attention flow (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020,
arXiv:2005.00928): the maximum flow through the layered attention graph, for the scorers (pure
functions, re-exported by :mod:`vtoken.scorers.functional`).

The graph of ``Lyr`` attention layers among ``m`` tokens has a node ``(l, i)`` for every layer
boundary ``l = 0..Lyr`` and token ``i``; the edge from ``(l, j)`` to ``(l + 1, i)`` has capacity
``A'_l[i, j]``, the attention of query ``i`` to key ``j`` at layer ``l`` mixed with the residual
stream (:func:`~vtoken.scorers.functional_attention.residual_attention`). The flow of input token
``v`` is the value of a maximum flow from ``(0, v)`` to ``(Lyr, q)``, ``q`` the query token.

Exact shortcuts: with one layer the only path is the edge ``(0, v) -> (1, q)``, so the flow is
``A'_0[q, v]``; with two layers every path runs ``(0, v) -> (1, j) -> (2, q)`` through one middle
node and no two paths share an edge, so the flow is ``sum_j min(A'_0[j, v], A'_1[q, j])``
(vectorised, O(m^2) per segment). From three layers on the graph has crossing paths and a general
maximum flow is solved per source: Dinic's algorithm on the residual graph (level graph by
breadth-first search, blocking flow by depth-first search), in Python floats (float64).
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch

from vtoken.scorers.functional_attention import residual_attention

#: residual capacity at or below which an edge counts as saturated (capacities are <= 1)
FLOW_EPS = 1e-12


def _bfs_levels(adj, head, cap, s, t) -> Optional[list]:
    level = [-1] * len(adj)
    level[s] = 0
    queue = deque([s])
    while queue:
        u = queue.popleft()
        for e in adj[u]:
            v = head[e]
            if level[v] < 0 and cap[e] > FLOW_EPS:
                level[v] = level[u] + 1
                queue.append(v)
    return level if level[t] >= 0 else None


def _blocking_flow(adj, head, cap, level, s, t) -> float:
    """Augment along shortest paths of the level graph until none is left (iterative DFS with
    per-node edge pointers, so dead ends are never scanned twice in a phase)."""
    ptr = [0] * len(adj)
    total = 0.0
    path = []  # edge ids from s to the current node
    u = s
    while True:
        if u == t:
            push = min(cap[e] for e in path)
            for e in path:
                cap[e] -= push
                cap[e ^ 1] += push
            total += push
            path.clear()
            u = s
            continue
        edges = adj[u]
        while ptr[u] < len(edges):
            e = edges[ptr[u]]
            if cap[e] > FLOW_EPS and level[head[e]] == level[u] + 1:
                break
            ptr[u] += 1
        if ptr[u] < len(edges):
            e = edges[ptr[u]]
            path.append(e)
            u = head[e]
        elif u == s:
            return total
        else:  # dead end: leave it for this phase and step back
            level[u] = -1
            e = path.pop()
            u = head[e ^ 1]
            ptr[u] += 1


def _add_edge(adj, head, cap, u, v, c) -> int:
    """Append edge u -> v of capacity c and its reverse (id ^ 1); returns the edge's id."""
    e = len(head)
    adj[u].append(e)
    head.append(v)
    cap.append(float(c))
    adj[v].append(e + 1)
    head.append(u)
    cap.append(0.0)
    return e


def max_flow(num_nodes: int, edges, s: int, t: int) -> float:
    """Value of a maximum s-t flow (Dinic) of a directed graph with ``edges`` = (u, v, capacity)
    triples, capacities >= 0 (real numbers; residuals <= :data:`FLOW_EPS` count as zero)."""
    adj = [[] for _ in range(num_nodes)]
    head, cap = [], []
    for u, v, c in edges:
        _add_edge(adj, head, cap, u, v, c)
    return _dinic(adj, head, cap, s, t)


def _dinic(adj, head, cap, s, t) -> float:
    total = 0.0
    while True:
        level = _bfs_levels(adj, head, cap, s, t)
        if level is None:
            return total
        total += _blocking_flow(adj, head, cap, level, s, t)


def _layered_flows(a: list, q: int, sources: list, tokens: list) -> list:
    """Max flow from ``(0, v)`` to ``(Lyr, q)`` for each v of ``sources`` (Lyr >= 3).

    a: Lyr nested lists A'_l[i][j] (float); tokens: the real token indices (padding rows and
    columns are left out). Nodes: 0 = the source (its edges are re-weighted per v), 1 = the
    sink, then (l, i) for l = 1..Lyr-1; the middle graph is built once.
    """
    Lyr = len(a)
    index = {}
    for layer in range(1, Lyr):
        for i in tokens:
            index[(layer, i)] = len(index) + 2
    adj = [[] for _ in range(len(index) + 2)]
    head, base = [], []
    src_edges = [(_add_edge(adj, head, base, 0, index[(1, i)], 0.0), i) for i in tokens]
    for layer in range(1, Lyr - 1):
        rows = a[layer]
        for j in tokens:  # (layer, j) -> (layer + 1, i) with capacity A'_layer[i, j]
            u = index[(layer, j)]
            for i in tokens:
                if rows[i][j] > 0.0:
                    _add_edge(adj, head, base, u, index[(layer + 1, i)], rows[i][j])
    top = a[Lyr - 1][q]
    for j in tokens:
        if top[j] > 0.0:
            _add_edge(adj, head, base, index[(Lyr - 1, j)], 1, top[j])
    out = []
    first = a[0]
    for v in sources:
        cap = list(base)
        for e, i in src_edges:
            cap[e] = first[i][v]
        out.append(_dinic(adj, head, cap, 0, 1))
    return out


def attention_flow(attn_layers: torch.Tensor, query: torch.Tensor, sources: torch.Tensor,
                   residual: float = 0.5) -> torch.Tensor:
    """Attention flow of chosen input tokens into the query token (see the module docstring).

    attn_layers (S, Lyr, m, m) head-averaged attention at layers 0..Lyr-1 (padding rows and
    columns zero), query (S,) long row of the query token, sources (S, n) long column of each
    input token to score (-1 = none) -> (S, n) float32 max-flow values (0 where -1).

    Cost: O(S m^2) for Lyr <= 2; from Lyr = 3 on, one Dinic run per source in Python,
    O(V^2 E) each in the worst case with V = (Lyr - 1) m + 2 nodes and E ~ (Lyr - 2) m^2 / 2
    edges (causal attention) -- for small m and analysis.
    """
    S, Lyr, m, _ = attn_layers.shape
    if Lyr == 0:
        raise ValueError("attention_flow needs at least one attention layer")
    a = residual_attention(attn_layers.double(), residual)
    rows = torch.arange(S, device=a.device)
    q = query.to(a.device)
    top = a[rows, Lyr - 1, q]  # (S, m): the query's row at the last layer
    if Lyr == 1:
        flow = top
    elif Lyr == 2:
        flow = torch.minimum(a[:, 0], top.unsqueeze(-1)).sum(dim=1)  # [s, v] = sum_j min(A'_0[j, v], A'_1[q, j])
    else:
        flow = None
    src = sources.to(a.device)
    if flow is not None:
        got = flow.gather(1, src.clamp(min=0))
    else:
        real = attn_layers.sum(dim=-1).amax(dim=1) > 0  # (S, m): tokens with an attention row
        got = torch.zeros(src.shape, dtype=torch.float64)
        for s in range(S):
            slots = [(k, c) for k, c in enumerate(src[s].tolist()) if c >= 0]
            if not slots:
                continue
            tokens = real[s].nonzero().flatten().tolist()
            values = _layered_flows(a[s].tolist(), int(q[s]), [c for _, c in slots], tokens)
            for (k, _), value in zip(slots, values):
                got[s, k] = value
        got = got.to(a.device)
    return got.float().masked_fill(src < 0, 0.0)


__all__ = ["attention_flow", "max_flow", "FLOW_EPS"]
