"""Task-free prediction across the adapter bank: federated class statistics of frozen features -> Gaussian router.

Every client summarises its local data of a task as sufficient statistics of the frozen backbone's features
(:class:`FeatureStats`: per class a count and a sum, plus one sum of outer products); sums and counts add up
exactly across clients. The router reads every stage's output average-pooled to a small spatial grid
(``RouterConfig.grid``; 0: the final pooled features), randomly projected to ``RouterConfig.dim``. The server
turns the statistics of every learned task into a shared-covariance Gaussian classifier (LDA with shrinkage)
over all learned ``(task, class)`` pairs: a single linear layer on those features (:func:`fit_router`).
:class:`TaskFreeModel` combines it with each task's adapter:
``score(t, c) = (1 - a) log p(t | x) + a log p(t, c | x) + log softmax(adapter_t(x))_c`` with ``a`` =
``RouterConfig.joint`` and ``p(t | x)`` the router's posterior summed over the classes of task ``t``. Neither
the router nor the adapters ever see a task id at prediction time. With a task given (task-aware prediction),
``RouterConfig.task_aware_mix`` > 0 adds that many times the log-posterior of the router's rows of the task's
classes to its adapter's log-probabilities (:func:`~fedpetah.routing.model.task_aware_scores`; 0, the default:
the adapter alone).

Modules, in import order: ``stats`` (:class:`FeatureStats`, their validation and exact sums), ``router`` (the
random projection and :func:`fit_router`), ``features`` (what the router reads from the frozen backbone, and what
a client computes: :func:`data_stats`), ``model`` (:class:`TaskFreeModel`), ``predict`` (a run's bank -> a
predictor) and ``export`` (``fedpetah-export``). The router's config is :class:`fedpetah.config.RouterConfig`.
"""
