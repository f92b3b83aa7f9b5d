-- Argo CD health check for xero-operator.io/XeroConnection (see deploy/argocd/README.md).
-- Reads the status the operator writes: Ready (the token Secret holds a usable access token),
-- Reconciling (not ready, and the operator is getting there on its own) and Stalled (not ready
-- until a person acts), each with observedGeneration and the same reason.
local hs = {}
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for xero-operator to reconcile the connection"
  return hs
end
local generation = obj.metadata.generation
local conditions = {}
for _, condition in ipairs(obj.status.conditions) do
  conditions[condition.type] = condition
end
local ready = conditions["Ready"]
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for xero-operator to reconcile the connection"
  return hs
end
if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "xero-operator has not reconciled the latest spec yet"
  return hs
end
local reason = ready.reason or ""
local message = ready.message or ""
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = reason .. ": " .. message
  return hs
end
local stalled = conditions["Stalled"]
if stalled ~= nil and stalled.status == "True" then
  if reason == "WaitingForAuthorization" then
    -- The first authorisation is a person's step in a browser: nothing failed.
    hs.status = "Suspended"
  else
    hs.status = "Degraded"
  end
  hs.message = reason .. ": " .. message
  return hs
end
hs.status = "Progressing"
hs.message = reason .. ": " .. message
return hs
