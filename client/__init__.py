"""The hospital side: the ClientApp, local training, and (later) the site daemon."""
