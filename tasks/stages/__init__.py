"""The pipeline stages as Prefect tasks: each reads its inputs, calls stein_core and the model family, and writes its
declared outputs atomically (prepare, classifier, train, sample, evaluate)."""
