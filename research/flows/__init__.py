"""Normalizing flows: coupling flows (NICE, RealNVP, Glow), neural spline flows, MAF and
flow matching.

  splines.py        monotone rational-quadratic splines with identity tails (the maths)
  bijectors.py      masks, conditioners, additive/affine/spline coupling, MADE and the masked
                    autoregressive layer, Scaling, ActNorm, invertible 1x1 convolution (LU), squeeze
  models.py         FlowStep / FlowStack (nn.scan), VectorFlow, MultiScaleFlow, make_flow
  objective.py      FlowObjective: maximum likelihood, sampling with temperature, bits/dim
  flow_matching.py  FlowMatchingObjective on the straight path, through the shared samplers
                    and likelihood code; reflow_pairs and straightness for rectified flow
  cnf.py            CNFObjective: FFJORD (maximum likelihood through the ODE, Hutchinson
                    training trace, exact evaluation trace, RNODE regularisers, adjoints)
Every bijector and flow: forward(x) -> (y, logdet [B]); inverse(y) -> (x, logdet [B]).
"""
