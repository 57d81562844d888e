"""Wiring of the agent process: runtimes, model repository, OIP server, daemon."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import AgentSettings
from agent.daemon import Agent
from compiler.manifest import ArtifactManifest

if TYPE_CHECKING:
    from agent.server import InferenceServer


def build_agent(settings: AgentSettings) -> tuple[Agent, InferenceServer]:
    """Create the daemon and its (not yet started) inference server.

    TVM runtime-only mode is switched on here, before anything imports ``tvm``.
    """
    from agent import runtimes
    from agent.metrics import AgentMetrics
    from agent.server import InferenceServer, ModelRepository

    runtimes.prepare_tvm_runtime_env()
    options = runtimes.RuntimeOptions(
        num_threads=settings.runtime.num_threads,
        ethos_u_delegate=settings.runtime.ethos_u_delegate,
    )
    repository = ModelRepository(max_concurrency=settings.http.max_concurrency)
    metrics = AgentMetrics()
    server = InferenceServer(repository, metrics=metrics)

    def loader(path: Path, manifest: ArtifactManifest) -> runtimes.LoadedModel:
        return runtimes.load(path, manifest, options=options)

    agent = Agent(
        settings,
        serving=repository,
        loader=loader,
        runtimes=runtimes.available_runtimes(options),
        metrics=metrics,
    )
    server.capture = agent.dataloop.offer
    return agent, server
