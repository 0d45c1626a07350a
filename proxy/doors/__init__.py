"""Front doors: client APIs other than OpenAI's Chat Completions (OpenAI's
Responses, Anthropic's Messages), each one module that translates its request
to a chat completion and the chat-shaped answer back. The pipeline, the
providers and every stage see only chat; a new front door is one file here
plus its line in ``registry``."""
