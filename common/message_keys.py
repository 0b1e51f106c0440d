"""The names of the numbers a site sends beside its model's metrics, which the server keeps apart."""

# seconds a site spent handling a message (open data, train or evaluate): a metric both
# replies carry; the server keeps it apart from the model's metrics
COMPUTE_SECONDS = "compute_seconds"

# under SecAgg+, the fraction of a site's update that the clipping range cut: the server warns
# when it is not zero (the aggregate is then biased)
CLIPPED_FRACTION = "secagg_clipped"

# quality weighting: the data-quality factor a site sends with its update (see
# ``fedscan.common.data.quality.quality_factor``)
QUALITY_FACTOR = "quality_factor"

# a plaintext training message may carry the evaluation of the model it holds (the previous
# round's global model): its config under this key; the site evaluates before it trains, and
# its reply carries the evaluation's metrics under EVALUATION (``fedscan.server.round_loop``)
EVALUATE_CONFIG = "evaluate-config"
EVALUATION = "evaluation"
# in such a reply: the site evaluated, but its training failed ({"reason": a category, no details})
TRAINING_FAILED = "training-failed"

# under SecAgg+ the training message is the protocol's legacy FitIns, whose config holds scalars
# only: the evaluation config rides there with each key under EVALUATE_PREFIX (and the flag
# EVALUATE_FIRST), and the site's evaluation metrics come back among the FitRes metrics under
# EVALUATION_PREFIX, its name under EVALUATED_SITE (``fedscan.server.secagg``, ``fedscan.client.secagg``)
EVALUATE_FIRST = "evaluate-first"
EVALUATE_PREFIX = "evaluate."
EVALUATION_PREFIX = "evaluation."
EVALUATED_SITE = "evaluation-site"
