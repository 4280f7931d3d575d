__version__ = "0.1.0"

# The public API: the main entry points of each stage, importable from the package itself
# (`from cde_workbench import load_deployment, get_engine, evaluate_predictions`). Each loads its module on
# first use, so `import cde_workbench` stays instant and loads neither scikit-learn nor polars.
# Written by hand (nbdev generates the modules, not this file); tests/test_api.py checks every name resolves.
_API = {
    # errors and the workspace (00_config)
    'Workspace': 'config', 'CDEError': 'config', 'ConfigError': 'config',
    'SchemaError': 'config', 'IngestError': 'config', 'PipelineError': 'config',
    # what a deployment is (03_deployment)
    'load_deployment': 'deployment', 'Deployment': 'deployment', 'Task': 'deployment', 'FeatureSet': 'deployment',
    'ModelSpec': 'deployment',
    # the store (01_store)
    'get_engine': 'store', 'redact_url': 'store',
    # data in (11_synth, 13_facts, 13a_events, 13b_rebuild, 14_warehouse)
    'HospitalConfig': 'synth', 'generate': 'synth', 'write_warehouse_extract': 'synth', 'write_hl7_feed': 'synth',
    'message_facts': 'facts', 'process_pending': 'events', 'replay': 'rebuild', 'load_warehouse_extract': 'warehouse',
    # research (20_tasks, 21_features, 21a_featurizer, 21b_feature_store, 23_registry, 30_evaluate, 31_train)
    'task_points': 'tasks', 'check_point_in_time': 'tasks',
    'load_feature_data': 'features', 'CountFeaturizer': 'featurizer', 'online_vector': 'feature_store',
    'train_deployment': 'train',
    'register_model': 'registry', 'resolve_model': 'registry', 'list_models': 'registry', 'load_bundle': 'registry',
    'set_alias': 'registry', 'test_predictions': 'registry',
    'evaluate_predictions': 'evaluate', 'read_predictions': 'evaluate', 'summary_text': 'evaluate',
    # deployment (40_deploy, 41_serve, 42_schedule, 43_labels)
    'set_status': 'deploy', 'deployment_state': 'deploy', 'score_pending': 'serve', 'run_notebook': 'schedule',
    'extract_labels': 'labels',
    # the order trigger and write-back (44_trigger, 45_writeback)
    'enqueue_new_orders': 'trigger', 'score_queued': 'trigger', 'TriggerWorker': 'trigger',
    'oru_message': 'writeback', 'queue_writebacks': 'writeback', 'send_due': 'writeback',
    # watching and reporting (50_monitor, 51_dashboard, 73_model_card, 74_report)
    'health': 'monitor', 'performance_rows': 'monitor', 'packets': 'monitor', 'weekly': 'monitor',
    'monitor_view': 'dashboard',
    'render_report': 'report', 'evaluation_report_html': 'report', 'model_card_html': 'model_card',
}

__all__ = ['__version__', *_API]


def __getattr__(name: str):
    "Load an entry point's module on first access (PEP 562)."
    if name not in _API: raise AttributeError(f"module 'cde_workbench' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f'{__name__}.{_API[name]}'), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_API})
