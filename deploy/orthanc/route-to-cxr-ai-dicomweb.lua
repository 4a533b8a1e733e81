-- Route chest radiographs to the cxr_platform DICOM node over DICOMweb (STOW-RS), for sites
-- that allow only HTTP between systems. Use it instead of route-to-cxr-ai.lua (not beside it,
-- or every image is classified twice).
--
-- Each stored CR, DX or secondary capture image is pushed by the DICOMweb plugin's client to the server named
-- AI_SERVER under "DicomWeb" > "Servers" (the node's /dicom-web root, with its key in
-- "HttpHeaders"). The push runs as an Orthanc job, so storing the image never waits for the AI.
-- The node's results come back by STOW-RS into the same study and are never pushed again.

local AI_SERVER = 'cxr-ai'
local AI_MANUFACTURER = 'cxr_platform'

local ROUTED_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.1'] = true,      -- Computed Radiography Image Storage
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,    -- Digital X-Ray Image Storage - For Presentation
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = true,  -- Digital X-Ray Image Storage - For Processing
  -- Film digitisers and some archives store chest radiographs as Secondary Capture; the node
  -- judges those by their pixels (its input gate) and ignores what is not a chest radiograph.
  ['1.2.840.10008.5.1.4.1.1.7'] = true,      -- Secondary Capture Image Storage
  ['1.2.840.10008.5.1.4.1.1.7.2'] = true,    -- Multi-frame Grayscale Byte Secondary Capture
  ['1.2.840.10008.5.1.4.1.1.7.3'] = true,    -- Multi-frame Grayscale Word Secondary Capture
}

function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags['Manufacturer'] == AI_MANUFACTURER then
    return
  end
  local sopClass = tags['SOPClassUID'] or metadata['SopClassUid']
  if not ROUTED_SOP_CLASSES[sopClass] then
    return
  end
  local push = {}
  push['Resources'] = { instanceId }
  push['Synchronous'] = false
  RestApiPost('/dicom-web/servers/' .. AI_SERVER .. '/stow', DumpJson(push, true))
end
