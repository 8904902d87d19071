"""A worker builds and runs its models before its first job (`InferenceWorker.warm_up`)."""

from __future__ import annotations

import threading

import inference.model.predictor as predictor
from dicom_node.export_targets import ExportTargets
from dicom_node.settings import RoutingRule, WorkerSettings
from dicom_node.worker import InferenceWorker, ModelRegistry
from inference.model.package import ModelPackage


def _worker(node, registry: ModelRegistry, model: str) -> InferenceWorker:
    rules = [RoutingRule(name="mr", match={"Modality": "MR"}, model=model)]
    return InferenceWorker(
        "warm-test", "cpu", node.db, node.store, WorkerSettings(), registry, threading.Event(), ExportTargets([]), rules
    )


def test_a_worker_builds_and_runs_its_rules_model_before_its_first_job(unstarted_node, firing_model, monkeypatch):
    """The network the first job asks for is already built, and torch's first calls are paid:
    the warm-up ran the real network once on an empty slice of the package's input size."""
    built: list[str] = []
    ran: list[tuple[int, ...]] = []
    real_build, real_predict = ModelPackage.build_model, predictor.predict_slices

    def build(self, device="cpu"):
        built.append(self.identity.display)
        return real_build(self, device)

    def predict(model, slices, **kwargs):
        ran.append(slices.shape)
        return real_predict(model, slices, **kwargs)

    monkeypatch.setattr(ModelPackage, "build_model", build)
    monkeypatch.setattr(predictor, "predict_slices", predict)
    registry = ModelRegistry()
    _worker(unstarted_node, registry, str(firing_model)).warm_up()
    assert len(built) == 1 and ran == [(1, 64, 64)]
    registry.network(str(firing_model), "cpu")  # what the first job asks for
    assert len(built) == 1


def test_a_failed_warm_up_leaves_the_worker_running(unstarted_node, firing_model, monkeypatch):
    """A model that cannot be built at start-up is logged; the worker goes on (a job needing it
    then fails with the reason, as before), it is not a dead thread."""

    def broken(self, device="cpu"):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ModelPackage, "build_model", broken)
    stop = threading.Event()
    worker = _worker(unstarted_node, ModelRegistry(), str(firing_model))
    worker.stop_event = stop
    worker.start()
    try:
        worker.join(timeout=2)  # warm-up done, now polling for jobs
        assert worker.is_alive()
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
