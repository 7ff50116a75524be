"""The planner: from an analysis and a byte budget to a type per tensor.

``policy`` (which types each role may take), ``damage`` (the damage model: predicted KLD per tensor and
type, from the analysis), ``allocate`` (the exact multiple-choice knapsack), ``planner`` (analysis dir +
budget -> plan), ``artifact`` (the ``QuantPlan`` file both exporters read)."""
