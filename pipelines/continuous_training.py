"""The continuous-training DAG (see README: architecture).

check_prerequisites -> ingest -> validate_data -(gate)-> sft -> dpo -> rl -> merge -> evaluate -> repair -(gate)->
register -> deploy_canary -> analyze_canary -> promote | rollback, with `reward` (from the dataset, next to sft)
feeding rl, inside an exit handler
(`finalize`) that rolls back a live canary and closes the MLflow runs of a failed or cancelled run

The alignment path (`train.alignment`) is chosen by the run config inside the stages, not by DAG branches: the
tasks off the path pass the adapter through in seconds (dpo under reward+rl and none; reward and rl under dpo and
none, without an MLflow run of their own). The chain is the same in every run, so evaluate always reads rl's
adapter: the SFT+DPO adapter, the SFT+RL adapter, or the SFT adapter. (Branching with dsl.If/Else and joining
with dsl.OneOf compiles, but kfp.local cannot select an artifact from a OneOf, and `tuneloop run` must work.)

The same pipeline runs on Kubeflow Pipelines (compiled YAML next to this file) and on one
machine with kfp.local (`tuneloop run`). The run config travels as one `config` parameter
and is validated again by every task. Cluster settings (resources, GPUs, tolerations, node
selectors, retries, timeouts) come from the config's `platform` section, the state volume, the
Secrets exposed as env and the plain env (OTEL_*) from its `kubernetes` section, at compile time: `build_pipeline(platform,
kubernetes)`; kfp.local ignores them.
"""

from kfp import dsl, kubernetes

from tuneloop import components as c
from tuneloop.config import KubernetesConfig, PlatformConfig, PodResources

PIPELINE_NAME = "tuneloop-continuous-training"
STATE_MOUNT = "/var/lib/tuneloop"  # state_dir of the committed YAML's tasks (no config at compile time)
# why a run stops at a gate (the MLflow outcome); orchestrate.run_direct says the same
STOP_DATA_GATE = "stopped: data validation failed"
STOP_EVALUATION_GATE = "rejected by the evaluation gate"


def _place(task: dsl.PipelineTask, res: PodResources, platform: PlatformConfig, k8s: KubernetesConfig,
           timeout_s: int, retries: bool, accelerators: int, state_dir: str) -> None:
    task.set_cpu_limit(res.cpu).set_memory_limit(res.memory)
    if res.accelerator_type and accelerators:
        task.set_accelerator_type(res.accelerator_type).set_accelerator_limit(accelerators)
    for key, value in res.node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for t in res.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    if k8s.state_pvc:
        kubernetes.mount_pvc(task, pvc_name=k8s.state_pvc, mount_path=state_dir)
    for s in k8s.secrets:
        kubernetes.use_secret_as_env(task, s.secret, {s.key: s.name})
    for name, value in k8s.env.items():
        task.set_env_variable(name, value)
    kubernetes.set_timeout(task, timeout_s)
    if retries and platform.retries:
        task.set_retry(num_retries=platform.retries, backoff_duration=f"{platform.retry_backoff_s}s",
                       backoff_factor=2.0)


def build_pipeline(platform: PlatformConfig, k8s: KubernetesConfig,  # noqa: ANN201 - a KFP pipeline
                   train_timeout_minutes: int = 120, nproc_per_node: int = 2, state_dir: str = STATE_MOUNT):
    """The DAG with `platform`'s pod settings; the state volume (`kubernetes.state_pvc`) is mounted at
    `state_dir` in every task, as the training pods mount it (train/k8s.py), so one path means one file
    everywhere."""
    t_task = platform.task_timeout_minutes * 60
    gpus = platform.gpu_tasks.accelerator_count(nproc_per_node)
    t_train = train_timeout_minutes * 60 + 600  # the launcher's own timeout fires first

    def cpu(task: dsl.PipelineTask, network: bool = True) -> dsl.PipelineTask:
        _place(task, platform.cpu_tasks, platform, k8s, t_task, network, platform.cpu_tasks.accelerators or 0,
               state_dir)
        return task

    def gpu(task: dsl.PipelineTask, timeout_s: int) -> dsl.PipelineTask:
        # retried too: a preempted training task resumes from its newest complete checkpoint
        _place(task, platform.gpu_tasks, platform, k8s, timeout_s, True, gpus, state_dir)
        return task

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Ingest, validate, SFT + DPO or reward model + online RL (DeepSpeed ZeRO-3), gated "
                              "evaluation against the champion, MLflow registry, canary rollout with automatic "
                              "promotion or rollback.")
    def continuous_training(config: dict, run_name: str = "tuneloop"):
        # runs last whatever happens: a failed or cancelled run leaves no canary live and no MLflow run open
        fin = cpu(c.finalize(config=config, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
        fin.set_caching_options(False)
        with dsl.ExitHandler(fin, name="finalize-run"):
            pre = cpu(c.check_prerequisites(config=config, run_name=run_name,
                                            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))
            pre.set_caching_options(False)
            parent = pre.outputs["parent_run_id"]

            data = cpu(c.ingest(config=config, parent_run_id=parent))
            data.set_caching_options(False)  # reads the feedback store, which changes between runs
            check = cpu(c.validate_data(config=config, parent_run_id=parent, dataset=data.outputs["dataset"]),
                        network=False)

            with dsl.If(check.outputs["passed"] == True, name="data-gate"):  # noqa: E712 - KFP condition syntax
                sft = gpu(c.sft(config=config, parent_run_id=parent, dataset=data.outputs["dataset"]), t_train)
                dpo = gpu(c.dpo(config=config, parent_run_id=parent, dataset=data.outputs["dataset"],
                                sft_adapter=sft.outputs["adapter"]), t_train)
                rw = gpu(c.reward(config=config, parent_run_id=parent, dataset=data.outputs["dataset"]), t_train)
                rw.set_caching_options(False)  # may reuse whatever reward model is champion now
                rl = gpu(c.rl(config=config, parent_run_id=parent, policy_adapter=dpo.outputs["adapter"],
                              reward_model=rw.outputs["reward_model"]), t_train)
                mg = gpu(c.merge(config=config, parent_run_id=parent, dataset=data.outputs["dataset"],
                                 candidate=rl.outputs["adapter"]), t_task)
                mg.set_caching_options(False)  # merges with whatever is champion now
                aligned = mg.outputs["adapter"]
                ev = gpu(c.evaluate(config=config, parent_run_id=parent, dataset=data.outputs["dataset"],
                                    adapter=aligned), t_task)
                ev.set_caching_options(False)  # compares against whatever is champion now
                # a candidate blocked only for forgetting old slices goes up the repair ladder; otherwise as is
                rp = gpu(c.repair(config=config, parent_run_id=parent, dataset=data.outputs["dataset"],
                                  candidate=aligned, evaluation=ev.outputs["evaluation"]), t_train)
                rp.set_caching_options(False)

                with dsl.If(rp.outputs["passed"] == True, name="evaluation-gate"):  # noqa: E712
                    reg = cpu(c.register(config=config, parent_run_id=parent, adapter=rp.outputs["adapter"],
                                         evaluation=rp.outputs["final_evaluation"],
                                         dataset=rp.outputs["final_dataset"]))
                    version = reg.outputs["Output"]
                    dep = cpu(c.deploy_canary(config=config, parent_run_id=parent, version=version))
                    ana = cpu(c.analyze_canary(config=config, parent_run_id=parent, version=version,
                                               deployed_at=dep.output))
                    with dsl.If(ana.outputs["decision"] == "promote", name="canary-healthy"):
                        cpu(c.promote(config=config, parent_run_id=parent, version=version)).set_caching_options(False)
                    with dsl.Else(name="canary-unhealthy"):
                        cpu(c.rollback(config=config, parent_run_id=parent, version=version)).set_caching_options(False)
                    for t in (reg, dep, ana):
                        t.set_caching_options(False)
                with dsl.Else(name="evaluation-rejected"):
                    cpu(c.stop(config=config, parent_run_id=parent, reason=STOP_EVALUATION_GATE),
                        ).set_caching_options(False)

            with dsl.Else(name="data-rejected"):
                cpu(c.stop(config=config, parent_run_id=parent, reason=STOP_DATA_GATE),
                    ).set_caching_options(False)

    return continuous_training


# The committed YAML (pipelines/continuous_training.yaml) is this, compiled with the default platform.
continuous_training = build_pipeline(PlatformConfig(), KubernetesConfig())
