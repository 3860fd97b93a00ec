"""The Responses API (`POST /v1/responses`), served statelessly on the chat pipeline: `request`
turns its body into a chat request, `formatter` turns engine outputs into its response object
and typed stream events, `api` plugs both into the gateway."""
