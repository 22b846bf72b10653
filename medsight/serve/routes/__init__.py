"""The JSON API, one router per resource; :func:`medsight.serve.app.create_app` includes them all."""

from medsight.serve.routes import (
    audit,
    auth,
    health,
    images,
    jobs,
    models,
    reviews,
    studies,
    users,
)

ROUTERS = tuple(m.router for m in (health, auth, models, studies, images, reviews, jobs, users, audit))
