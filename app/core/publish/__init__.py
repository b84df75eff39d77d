"""Publishing a merged model to the Hugging Face Hub: plan_publish checks everything and builds the card,
publish uploads it (resumable after an interruption). No Qt, no printing."""

from app.core.publish.plan import PublishPlan, PublishRequest, plan_publish
from app.core.publish.upload import PublishError, PublishResult, publish

__all__ = ["PublishError", "PublishPlan", "PublishRequest", "PublishResult", "plan_publish", "publish"]
