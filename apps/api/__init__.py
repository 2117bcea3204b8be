"""An OpenAI-compatible HTTP API in front of the swarm (`swarm-chat serve`).

schema: the request and response bodies (pydantic); text: stop strings and streamed text (pure);
backend: generation through the swarm in a thread pool; app: the FastAPI routes and error shapes.
"""
