// The interactive API console: Swagger UI (from the swagger-ui-py package, served by this server
// under /static/swagger-ui/) rendering this server's own /openapi.json. "Try it out" sends real
// requests to this server.
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  displayRequestDuration: true, // shows how long each "Try it out" request took
  persistAuthorization: true, // an API key entered under "Authorize" survives a reload
  tryItOutEnabled: true,
  defaultModelsExpandDepth: 0, // schemas stay folded until asked for
  validatorUrl: null, // never send the document to an outside validator
});
