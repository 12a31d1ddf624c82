"""Built-in splitserve task plugins (imported as ``splitserve_tasks``); they register through the
``splitserve.tasks`` entry-point group exactly like third-party plugins."""
