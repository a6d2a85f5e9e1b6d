from .resources import *  # noqa: F401,F403
from .resources import API_VERSION, KINDS, Network, Node, Workload  # noqa: F401
