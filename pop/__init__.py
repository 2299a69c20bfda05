"""pop: an anycast/BGP edge PoP controller for VPN providers.

Data flows one way: checks -> hysteresis -> verdict -> desired state -> adapters -> status.
"""

__version__ = "0.1.0"
