-- Orthanc auto-routing for the neuronode demo (deploy/compose.yaml).
-- Every MR instance that reaches Orthanc (a modality's C-STORE, or an upload through the REST
-- API or Orthanc Explorer) is sent on to the node, the modality "neuronode" of orthanc.json.
-- What the node sends back (SR and heatmap Secondary Captures, from AE title NEURONODE) is never
-- forwarded again: that would send the results round in a loop.

local NODE_MODALITY = 'neuronode'
local NODE_AET = 'NEURONODE'

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RemoteAet'] == NODE_AET then
    return
  end
  if tags['Modality'] ~= 'MR' then
    return
  end
  SendToModality(instanceId, NODE_MODALITY)
end
