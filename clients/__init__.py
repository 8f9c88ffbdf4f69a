"""prunegraph's thin client side: what runs next to the user's live torch model.

The HTTP client, manifests, plan application and activation capture arrive with the planner and
service (see the project issues); the report model it reads is :class:`graphs.Report`.
"""

__all__: list[str] = []
